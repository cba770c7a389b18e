"""Enforcer configuration: the shared ``HOSTISO_*`` settings plus long-poll and lane tuning."""

from __future__ import annotations

from pydantic import Field

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
