"""Configuration base: every service reads only ``HOSTISO_*`` environment variables."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.addresses import AddressRuleError, parse_host_address
from shared.topics import TopicName

# Marked dev defaults: usable only with HOSTISO_DEV=1, refused otherwise.
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789"
DEV_ENROLLMENT_SECRET = "dev-only-enrollment-secret-change-me"
_DEV_SECRETS = {DEV_JWT_SECRET, DEV_ENROLLMENT_SECRET}

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration is unusable (missing secret, dev secret outside dev mode, bad value)."""


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServiceSettings(BaseSettings):
    """Settings shared by every service; each service subclasses it for its own port and extras."""

    model_config = SettingsConfigDict(
        env_prefix="HOSTISO_", extra="ignore", frozen=True, env_ignore_empty=True
    )

    dev: bool = Field(False, description="Dev mode: allows the marked dev secrets.")
    kafka_bootstrap: str = "127.0.0.1:9092"
    # PLAINTEXT stays possible (dev, bench) but is logged: without SASL and ACLs anyone who
    # reaches the broker can write enforcer commands (docs/operations.md, "Kafka security").
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = Field(
        None,
        description="PEM CA bundle that signed the brokers' certificates (system CAs if unset).",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_ca_file: str | None = Field(
        None, description="PEM CA bundle for a rediss:// URL (system CAs if unset)."
    )
    redis_cluster: bool = Field(
        False,
        description="The Redis URL names a node of a Redis Cluster (also: a redis+cluster:// URL).",
    )
    topic_prefix: str = "hostiso."
    redis_prefix: str = "hostiso:"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    jwt_secret: SecretStr | None = None
    jwt_max_lifetime_s: int = Field(
        24 * 3600, ge=60, description="Longest JWT lifetime (exp - iat) accepted for user roles."
    )
    jwt_service_max_lifetime_s: int = Field(
        3600,
        ge=60,
        description="Longest lifetime accepted for a service token (at most the above).",
    )
    http_max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Request bodies above this get 413 before they are read."
    )
    enrollment_secret: SecretStr | None = None
    # Base64 (raw 32 bytes) Ed25519 private key; only the enforcer uses it.
    signing_key: SecretStr | None = None
    platform_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="Addresses of the platform that isolation always allows (comma-separated).",
    )
    topic_replication_factor: int = Field(
        1,
        ge=1,
        le=7,
        description="Replication factor of the topics a service creates (3 on a 3-broker cluster).",
    )
    topic_min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="min.insync.replicas of the topics a service creates (2 with RF 3).",
    )
    topic_partitions: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="Partition counts by topic, e.g. `isolation.requests.v1=24,enforcer.commands.v1=24`"
        " (defaults: shared/topics.py).",
    )
    allowlist_max_entries: int = Field(100, ge=1, le=10_000)
    instance_id: str = "local"
    # Static group membership (group.instance.id = HOSTISO_INSTANCE_ID): a restarted instance
    # gets its partitions back without a rebalance. Needs a distinct instance id per instance.
    kafka_static_membership: bool = False
    # Non-transient failures of one record before it is dead-lettered (DESIGN §6, guarantee 12).
    consumer_max_attempts: int = Field(5, ge=1, le=100)
    log_level: str = "INFO"
    log_json: bool = True

    _platform_split = field_validator("platform_addresses", mode="before")(_split_csv)

    @field_validator("platform_addresses")
    @classmethod
    def _platform_are_ip(cls, value: list[str]) -> list[str]:
        # The same rules as a policy's `platform` (isolation copies these into every policy),
        # narrowed to single addresses: a zone id or a non-unicast address would fail every
        # agent's `nft -f`, so it is a configuration error here, not a host left open there.
        for item in value:
            try:
                parse_host_address(item)
            except AddressRuleError as exc:
                raise ValueError(
                    f"HOSTISO_PLATFORM_ADDRESSES: {item!r} {exc.message} (rule: {exc.rule})"
                ) from exc
        return value

    @field_validator("topic_partitions", mode="before")
    @classmethod
    def _parse_partitions(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        counts: dict[str, Any] = {}
        for part in _split_csv(value):
            name, sep, count = part.partition("=")
            if not sep:
                raise ValueError(
                    f"HOSTISO_TOPIC_PARTITIONS: {part!r} is not TOPIC=COUNT "
                    "(e.g. isolation.requests.v1=24)"
                )
            counts[name.strip()] = count.strip()
        return counts

    @field_validator("topic_partitions")
    @classmethod
    def _known_topics(cls, value: dict[str, int]) -> dict[str, int]:
        known = {name.value for name in TopicName}
        for name, count in value.items():
            if name not in known:
                raise ValueError(
                    f"HOSTISO_TOPIC_PARTITIONS: unknown topic {name!r} (one of {sorted(known)})"
                )
            if not 1 <= count <= 10_000:
                raise ValueError(
                    f"HOSTISO_TOPIC_PARTITIONS: {name} needs 1 to 10000 partitions, got {count}"
                )
        return value

    @property
    def topic_partition_counts(self) -> dict[TopicName, int]:
        return {TopicName(name): count for name, count in self.topic_partitions.items()}

    @model_validator(mode="after")
    def _min_isr_within_replicas(self) -> ServiceSettings:
        isr = self.topic_min_insync_replicas
        if isr is not None and isr > self.topic_replication_factor:
            raise ValueError(
                f"HOSTISO_TOPIC_MIN_INSYNC_REPLICAS ({isr}) cannot exceed "
                f"HOSTISO_TOPIC_REPLICATION_FACTOR ({self.topic_replication_factor})"
            )
        return self

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> ServiceSettings:
        if self.kafka_security_protocol.startswith("SASL_"):
            if not self.kafka_sasl_username:
                raise ConfigError(
                    "HOSTISO_KAFKA_SASL_USERNAME is required when "
                    f"HOSTISO_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
                )
            if self.kafka_sasl_password is None or not self.kafka_sasl_password.get_secret_value():
                raise ConfigError(
                    "HOSTISO_KAFKA_SASL_PASSWORD is required when "
                    f"HOSTISO_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
                )
        if self.kafka_security_protocol == "PLAINTEXT" and not self.dev:
            log.warning(
                "HOSTISO_KAFKA_SECURITY_PROTOCOL=PLAINTEXT outside dev mode: the broker cannot "
                "tell this service from anyone else on the network"
            )
        return self

    @model_validator(mode="after")
    def _refuse_dev_secrets_outside_dev(self) -> ServiceSettings:
        if self.dev:
            return self
        for name in ("jwt_secret", "enrollment_secret"):
            secret: SecretStr | None = getattr(self, name)
            if secret is not None and secret.get_secret_value() in _DEV_SECRETS:
                raise ValueError(f"HOSTISO_{name.upper()} is the dev default; set a real secret")
        return self

    def require_secret(self, name: str) -> str:
        """The secret's value; in dev mode the marked dev default if unset; else a ConfigError."""
        secret: SecretStr | None = getattr(self, name)
        if secret is not None:
            value = secret.get_secret_value()
            if len(value) < 32:
                raise ConfigError(f"HOSTISO_{name.upper()} must be at least 32 characters")
            return value
        if self.dev:
            return DEV_JWT_SECRET if name == "jwt_secret" else DEV_ENROLLMENT_SECRET
        raise ConfigError(f"HOSTISO_{name.upper()} is required outside dev mode (HOSTISO_DEV=1)")
