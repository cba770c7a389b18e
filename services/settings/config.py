"""Settings service configuration (``HOSTISO_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.addresses import WIDEST_PREFIX_V4, WIDEST_PREFIX_V6
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
    isolation_url: str = Field(
        "http://127.0.0.1:8002",
        description="The isolation API's URL as this service reaches it (HOSTISO_ISOLATION_URL): "
        "a revoke asks it how many endpoints the revocation tightens.",
    )
    revoke_count_timeout_s: float = Field(
        3.0, gt=0, description="How long a revoke waits for that count before answering null."
    )
    isolation_public_url: str = Field(
        "http://127.0.0.1:8002",
        description="The isolation API's URL as the browser reaches it (the portal page calls it).",
    )
    # DESIGN §7: the widest allowlist prefixes. Their lower bounds are the widest any agent
    # renders (shared/addresses.py WIDEST_PREFIX_V4/V6); a policy never carries a wider one.
    allowlist_max_prefix_v4: int = Field(
        24,
        ge=WIDEST_PREFIX_V4,
        le=32,
        description="Widest IPv4 CIDR an entry may give (HOSTISO_ALLOWLIST_MAX_PREFIX_V4).",
    )
    allowlist_max_prefix_v6: int = Field(
        64,
        ge=WIDEST_PREFIX_V6,
        le=128,
        description="Widest IPv6 prefix an entry may give (HOSTISO_ALLOWLIST_MAX_PREFIX_V6).",
    )
