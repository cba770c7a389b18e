"""Topic replication, min ISR and partition counts come from configuration, with clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import ServiceSettings
from shared.topics import TopicName

pytestmark = pytest.mark.unit


def test_partition_counts_are_parsed_by_topic_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "HOSTISO_TOPIC_PARTITIONS", "isolation.requests.v1=24, enforcer.commands.priority.v1=12"
    )
    monkeypatch.setenv("HOSTISO_TOPIC_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("HOSTISO_TOPIC_MIN_INSYNC_REPLICAS", "2")
    settings = ServiceSettings(dev=True)
    assert settings.topic_partition_counts == {
        TopicName.ISOLATION_REQUESTS: 24,
        TopicName.ENFORCER_COMMANDS_PRIORITY: 12,
    }
    assert (settings.topic_replication_factor, settings.topic_min_insync_replicas) == (3, 2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("isolation.requests.v1", "is not TOPIC=COUNT"),
        ("no.such.topic=3", "unknown topic 'no.such.topic'"),
        ("dlq.v1=0", "dlq.v1 needs 1 to 10000 partitions"),
        ("dlq.v1=many", "valid integer"),
    ],
)
def test_bad_partition_counts_name_the_variable_and_the_rule(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("HOSTISO_TOPIC_PARTITIONS", value)
    with pytest.raises(ValidationError, match=message):
        ServiceSettings(dev=True)


def test_min_insync_replicas_cannot_exceed_the_replication_factor() -> None:
    with pytest.raises(ValidationError, match="cannot exceed HOSTISO_TOPIC_REPLICATION_FACTOR"):
        ServiceSettings(dev=True, topic_replication_factor=1, topic_min_insync_replicas=2)
