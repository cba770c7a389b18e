"""Isolation service configuration (``HOSTISO_*``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from shared.config import ServiceSettings


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class IsolationSettings(ServiceSettings):
    """Settings of the isolation service: its port, the settings API and the portal origins."""

    http_port: int = 8002
    settings_url: str = Field(
        "http://127.0.0.1:8001", description="Settings service base URL (allowlist switch)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8001", "http://localhost:8001"],
        description="Origins allowed to call this API from a browser (comma-separated).",
    )
    request_outcome_ttl_s: int = Field(
        24 * 3600,
        ge=3600,
        description="How long a request's outcome is kept so that a redelivered request is "
        "recognised instead of applied again: longer than any record can wait uncommitted.",
    )
    catch_up_timeout_s: float = Field(
        10.0, gt=0, description="How long a snapshot waits for the settings replica to catch up."
    )

    _cors_split = field_validator("cors_origins", mode="before")(_split_csv)
