"""Messages evolve compatibly: an older consumer decodes a newer producer's message (DESIGN §9),
with the Python models and with the checked-in JSON Schemas alike."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from pydantic import ValidationError

from shared.messages import SignedPolicy, decode
from shared.topics import TopicName
from tests.samples import SAMPLES, sample_policy
from tools.docs import DOCS_DIR, SCHEMAS_DIR

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("topic", "key", "message"), SAMPLES, ids=lambda v: getattr(v, "type", None)
)
def test_fields_added_by_a_newer_producer_are_ignored(
    topic: TopicName, key: str, message: object
) -> None:
    newer = json.loads(message.to_bytes())  # type: ignore[attr-defined]
    newer["added_in_a_later_release"] = {"anything": [1, 2, 3]}
    if isinstance(newer.get("requested_by"), dict):
        newer["requested_by"]["team"] = "night shift"
    assert decode(topic, json.dumps(newer).encode()) == message


def test_a_signed_policy_with_a_field_the_agent_does_not_know_is_refused() -> None:
    signed = {
        "policy": {**sample_policy().model_dump(mode="json"), "expires_never": True},
        "key_id": "0" * 16,
        "signature": "AA==",
    }
    with pytest.raises(ValidationError, match="expires_never"):
        SignedPolicy.model_validate(signed)


def _schema(topic: TopicName, message: object) -> dict[str, object]:
    path = DOCS_DIR / SCHEMAS_DIR / topic.value / f"{type(message).__name__}.json"
    loaded: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@pytest.mark.parametrize(
    ("topic", "key", "message"), SAMPLES, ids=lambda v: getattr(v, "type", None)
)
def test_checked_in_schema_accepts_a_newer_producers_message(
    topic: TopicName, key: str, message: object
) -> None:
    # What a consumer in another language validates against: the published schema file.
    validator = jsonschema_rs.Draft202012Validator(_schema(topic, message))
    current = json.loads(message.to_bytes())  # type: ignore[attr-defined]
    assert validator.is_valid(current)
    newer = {**current, "added_in_a_later_release": {"anything": [1, 2, 3]}}
    assert validator.is_valid(newer)
    assert not validator.is_valid({**current, "type": "SomethingElse"})


def test_checked_in_schema_refuses_a_signed_policy_with_an_unknown_field() -> None:
    topic, _, command = next(s for s in SAMPLES if s[0] == TopicName.ENFORCER_COMMANDS)
    validator = jsonschema_rs.Draft202012Validator(_schema(topic, command))
    current = json.loads(command.to_bytes())
    assert validator.is_valid(current)
    current["policy"]["expires_never"] = True
    assert not validator.is_valid(current)
