"""Enforcer configuration: the shared ``HOSTISO_*`` settings plus long-poll and lane tuning."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from shared.config import ServiceSettings


class EnforcerSettings(ServiceSettings):
    """Settings of the enforcer service (``HOSTISO_*``)."""

    http_port: int = 8003
    long_poll_max_s: float = Field(
        60.0, gt=0, le=600, description="Longest wait an agent may ask for on the policy route."
    )
    redis_max_connections: int = Field(
        64,
        ge=2,
        le=10_000,
        description="Redis connections this process may open; requests queue for one beyond that.",
    )
    normal_lane_batch: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Records per batch on the normal command lane; small enough that the"
        " priority lane, on the same event loop, never waits long behind one batch.",
    )
    priority_lane_batch: int = Field(
        100, ge=1, le=10_000, description="Records per batch on the priority command lane."
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (chain) the agent API is served with over HTTPS;"
        " with tls_key_file. Agents refuse plain http outside dev mode.",
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file (keep it mode 0600)."
    )
    last_seen_interval_s: int = Field(
        300,
        ge=1,
        le=86_400,
        description="At most one last_seen update per endpoint on endpoints.v1 in this many"
        " seconds (the agent's long poll marks it seen).",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> EnforcerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("HOSTISO_TLS_CERT_FILE and HOSTISO_TLS_KEY_FILE: give both or neither")
        for name, path in (("CERT", self.tls_cert_file), ("KEY", self.tls_key_file)):
            if path is not None and not path.is_file():
                raise ValueError(f"HOSTISO_TLS_{name}_FILE {path}: no such file")
        return self

    enrollment_rate_per_minute: int = Field(
        60,
        ge=1,
        le=100_000,
        description="Enrollment attempts (good keys and bad) one account may make per minute;"
        " beyond that the enroll route answers 429 with Retry-After.",
    )
    enrollment_max_endpoints_per_account: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Enrolled endpoints one account may have; a new enrollment beyond it is"
        " refused (403). Re-enrolling an existing endpoint does not count.",
    )
