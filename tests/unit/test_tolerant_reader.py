"""Messages evolve compatibly: an older consumer decodes a newer producer's message (DESIGN §9)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.messages import SignedPolicy, decode
from shared.topics import TopicName
from tests.samples import SAMPLES, sample_policy

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
