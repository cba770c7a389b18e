"""Prometheus metrics of the settings service: outbox depth, publish latency (HTTP requests are counted by shared.http)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SettingsMetrics:
    """The service's own metrics, registered in the runtime's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outbox_depth = Gauge(
            "hostiso_settings_outbox_depth",
            "Committed allowlist changes not yet published to Kafka, summed over every outbox "
            "shard (the same deployment-wide figure on every instance)",
            registry=registry,
        )
        self.publish_latency = Histogram(
            "hostiso_settings_publish_latency_seconds",
            "Time from the Redis commit of a change to Kafka's acknowledgement of its event",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.published = Counter(
            "hostiso_settings_events_published_total",
            "AllowlistChanged events acknowledged by Kafka (republished duplicates included)",
            registry=registry,
        )
        self.publish_failures = Counter(
            "hostiso_settings_publish_failures_total",
            "Relay passes that failed to publish (Kafka unreachable or refused)",
            registry=registry,
        )
        self.audit_failures = Counter(
            "hostiso_settings_audit_failures_total",
            "Audit events of refused attempts that could not be published",
            registry=registry,
        )
        self.relay_leader = Gauge(
            "hostiso_settings_relay_leader",
            "Outbox shards whose relay lease this instance holds (0: a standby instance)",
            registry=registry,
        )
        self.unrelayed_shards = Gauge(
            "hostiso_settings_relay_unowned_shards",
            "Outbox shards no instance holds the relay lease of (their writes wait; raise "
            "HOSTISO_RELAY_MAX_SHARDS or add instances if this stays above 0)",
            registry=registry,
        )
        self.unpublished_writes = Counter(
            "hostiso_settings_unpublished_writes_total",
            "Writes answered 503 because their event was not in Kafka before the deadline",
            registry=registry,
        )
