"""Settings service configuration (``HOSTISO_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.config import ServiceSettings


class SettingsServiceSettings(ServiceSettings):
    """The shared settings plus the outbox relay and read-your-writes knobs."""

    http_port: int = 8001
    publish_wait_s: float = Field(
        5.0,
        gt=0,
        description="How long a write waits for its event to be in Kafka before answering 503.",
    )
    relay_lease_ms: int = Field(
        5000,
        ge=200,
        description="Lease of each outbox shard's relay lock (one relay publishes a shard).",
    )
    settings_shards: int = Field(
        16,
        ge=1,
        le=1024,
        description="Outbox shards (HOSTISO_SETTINGS_SHARDS): an account belongs to shard "
        "crc32(account_id) % shards, whose keys share one Redis Cluster hash slot and whose "
        "outbox one relay publishes. Fixed for a deployment: changing it moves every account.",
    )
    relay_max_shards: int | None = Field(
        None,
        ge=1,
        description="At most this many shard leases held by one instance (HOSTISO_RELAY_MAX_SHARDS"
        "; unset: all), so several instances share the relaying.",
    )
    relay_batch: int = Field(500, ge=1, le=10_000, description="Outbox entries per relay pass.")
    relay_idle_s: float = Field(
        0.1, gt=0, description="Relay poll interval when no local write woke it."
    )
    audit_timeout_s: float = Field(
        2.0, gt=0, description="Deadline to publish the audit event of a refused attempt."
    )
    history_max_records: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="History records kept per account (HOSTISO_HISTORY_MAX_RECORDS); older ones "
        "are trimmed on write. The full trail is on the audit topic.",
    )
    isolation_public_url: str = Field(
        "http://127.0.0.1:8002",
        description="The isolation API's URL as the browser reaches it (the portal page calls it).",
    )
