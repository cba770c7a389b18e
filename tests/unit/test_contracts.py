"""Message contracts: frozen, strict, discriminated by type, every topic covered."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.messages import TOPIC_MESSAGE_TYPES, IsolateEndpoint, decode
from shared.topics import TOPIC_SPECS, TopicName, Topics
from tests.samples import SAMPLES, SOC


def test_every_topic_has_a_spec_and_a_message_type() -> None:
    assert {s.name for s in TOPIC_SPECS} == set(TopicName) == set(TOPIC_MESSAGE_TYPES)
    assert {s.name for s in TOPIC_SPECS if s.compacted} == {
        TopicName.SETTINGS_ALLOWLIST,
        TopicName.ENDPOINTS,
        TopicName.ISOLATION_EVENTS,
    }


def test_samples_cover_every_topic() -> None:
    assert {topic for topic, _, _ in SAMPLES} == set(TopicName)


@pytest.mark.parametrize(
    ("topic", "key", "message"), SAMPLES, ids=lambda v: getattr(v, "type", None)
)
def test_message_round_trips_through_json(topic: TopicName, key: str, message: object) -> None:
    assert decode(topic, message.to_bytes()) == message  # type: ignore[attr-defined]


def test_messages_are_frozen() -> None:
    msg = IsolateEndpoint(endpoint_id="ep", mode="strict", requested_by=SOC)
    with pytest.raises(ValidationError):
        msg.mode = "standard"  # type: ignore[misc]


def test_unknown_type_version_and_bad_values_are_rejected() -> None:
    # Unknown fields are ignored within a schema version (tests/unit/test_tolerant_reader.py).
    good = IsolateEndpoint(endpoint_id="ep", mode="strict", requested_by=SOC).model_dump(
        mode="json"
    )
    import orjson

    for bad, field in [
        ({**good, "type": "Nope"}, "type"),
        ({**good, "schema_version": 2}, "schema_version"),
        ({**good, "mode": "loose"}, "mode"),
    ]:
        with pytest.raises(ValidationError) as exc:
            decode(TopicName.ISOLATION_REQUESTS, orjson.dumps(bad))
        assert field in str(exc.value) or "discriminator" in str(exc.value)


def test_topic_prefix_is_applied_and_stripped() -> None:
    topics = Topics("acme.")
    assert topics.settings_allowlist == "acme.settings.allowlist.v1"
    assert topics.unprefixed("acme.dlq.v1") is TopicName.DLQ
    with pytest.raises(ValueError, match="prefix"):
        topics.unprefixed("other.dlq.v1")
