"""The one place that names the topics, their keys, partition counts and cleanup policies."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TopicName(StrEnum):
    """Topic names without the configurable prefix (DESIGN.md §2)."""

    SETTINGS_ALLOWLIST = "settings.allowlist.v1"
    ENDPOINTS = "endpoints.v1"
    ISOLATION_REQUESTS = "isolation.requests.v1"
    ISOLATION_REQUESTS_PRIORITY = "isolation.requests.priority.v1"
    ISOLATION_STATUS = "isolation.status.v1"
    ISOLATION_EVENTS = "isolation.events.v1"
    ENFORCER_COMMANDS = "enforcer.commands.v1"
    ENFORCER_COMMANDS_PRIORITY = "enforcer.commands.priority.v1"
    AUDIT = "audit.v1"
    DLQ = "dlq.v1"


class GroupName(StrEnum):
    """Consumer group ids without the topic prefix: one group per lane, shared by instances.

    Each lane has its own group so it commits and lags on its own (the priority lanes never
    wait for the normal lanes' position, guarantee 5).
    """

    ISOLATION_REQUESTS = "isolation"
    ISOLATION_REQUESTS_PRIORITY = "isolation-priority"
    ISOLATION_STATUS = "isolation-status"
    # The isolation service's revocation fan-out reads settings.allowlist.v1 in a group of its
    # own (the replicas read it without one): each revocation is fanned out by one instance.
    ISOLATION_REVOCATIONS = "isolation-revocations"
    ENFORCER_COMMANDS = "enforcer-normal"
    ENFORCER_COMMANDS_PRIORITY = "enforcer-priority"
    # Not consumer groups (the replicas read every partition without one): the name their
    # dead letters carry as consumer_group.
    ISOLATION_SETTINGS_REPLICA = "isolation-settings-replica"
    ISOLATION_ENDPOINT_REGISTRY = "isolation-endpoint-registry"


@dataclass(frozen=True)
class TopicSpec:
    """How a topic is keyed, partitioned and cleaned up."""

    name: TopicName
    key: str
    partitions: int
    compacted: bool = False

    @property
    def cleanup_policy(self) -> str:
        return "compact" if self.compacted else "delete"


TOPIC_SPECS: tuple[TopicSpec, ...] = (
    # Full state per account / endpoint: compacted so a new consumer rebuilds from it.
    TopicSpec(TopicName.SETTINGS_ALLOWLIST, key="account_id", partitions=6, compacted=True),
    TopicSpec(TopicName.ENDPOINTS, key="endpoint_id", partitions=6, compacted=True),
    TopicSpec(TopicName.ISOLATION_REQUESTS, key="endpoint_id", partitions=6),
    TopicSpec(TopicName.ISOLATION_REQUESTS_PRIORITY, key="endpoint_id", partitions=6),
    TopicSpec(TopicName.ISOLATION_STATUS, key="endpoint_id", partitions=6),
    # For other platform services (ticketing, alerting): full state per endpoint, so compacted.
    TopicSpec(TopicName.ISOLATION_EVENTS, key="endpoint_id", partitions=6, compacted=True),
    TopicSpec(TopicName.ENFORCER_COMMANDS, key="endpoint_id", partitions=6),
    TopicSpec(TopicName.ENFORCER_COMMANDS_PRIORITY, key="endpoint_id", partitions=6),
    TopicSpec(TopicName.AUDIT, key="account_id", partitions=3),
    TopicSpec(TopicName.DLQ, key="source_topic", partitions=1),
)


class Topics:
    """Prefixed topic names for one deployment (``HOSTISO_TOPIC_PREFIX``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, name: TopicName) -> str:
        return f"{self.prefix}{name.value}"

    def group(self, name: GroupName) -> str:
        """The prefixed consumer group id (deployments sharing a cluster stay apart)."""
        return f"{self.prefix}{name.value}"

    def unprefixed(self, full_name: str) -> TopicName:
        if not full_name.startswith(self.prefix):
            raise ValueError(f"topic {full_name!r} does not carry the prefix {self.prefix!r}")
        return TopicName(full_name[len(self.prefix) :])

    @property
    def settings_allowlist(self) -> str:
        return self(TopicName.SETTINGS_ALLOWLIST)

    @property
    def endpoints(self) -> str:
        return self(TopicName.ENDPOINTS)

    @property
    def isolation_requests(self) -> str:
        return self(TopicName.ISOLATION_REQUESTS)

    @property
    def isolation_requests_priority(self) -> str:
        return self(TopicName.ISOLATION_REQUESTS_PRIORITY)

    @property
    def isolation_events(self) -> str:
        return self(TopicName.ISOLATION_EVENTS)

    @property
    def isolation_status(self) -> str:
        return self(TopicName.ISOLATION_STATUS)

    @property
    def enforcer_commands(self) -> str:
        return self(TopicName.ENFORCER_COMMANDS)

    @property
    def enforcer_commands_priority(self) -> str:
        return self(TopicName.ENFORCER_COMMANDS_PRIORITY)

    @property
    def audit(self) -> str:
        return self(TopicName.AUDIT)

    @property
    def dlq(self) -> str:
        return self(TopicName.DLQ)
