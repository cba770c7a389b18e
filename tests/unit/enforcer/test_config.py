"""The enforcer refuses to run without a real signing key outside dev mode."""

from __future__ import annotations

import base64

import pytest

from services.enforcer.bootstrap import build_app, configured_signer
from services.enforcer.config import EnforcerSettings
from services.enforcer.signing import generate_private_key_b64, key_id_for
from shared.config import ConfigError

REAL_SECRET = "x" * 40


def settings(**values: object) -> EnforcerSettings:
    return EnforcerSettings.model_validate(
        {"jwt_secret": REAL_SECRET, "enrollment_secret": REAL_SECRET, **values}
    )


def test_default_port_is_8003() -> None:
    assert settings().http_port == 8003


def test_no_signing_key_outside_dev_mode_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="HOSTISO_SIGNING_KEY is required outside dev mode"):
        configured_signer(settings(dev=False))


async def test_build_app_refuses_without_a_signing_key_outside_dev_mode() -> None:
    with pytest.raises(ConfigError, match="HOSTISO_SIGNING_KEY"):
        build_app(settings(dev=False))


def test_malformed_signing_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="32 raw bytes"):
        configured_signer(settings(signing_key=base64.b64encode(b"x" * 16).decode()))


def test_configured_key_is_used_and_dev_mode_without_key_defers_to_the_dev_key() -> None:
    encoded = generate_private_key_b64()
    signer = configured_signer(settings(signing_key=encoded))
    assert signer is not None and not signer.dev_key
    assert signer.key_id == key_id_for(signer.public_raw)
    assert configured_signer(settings(dev=True)) is None
