"""``make run`` prints a dev token the services accept: signed with the secret in force."""

from __future__ import annotations

import jwt
import pytest

from shared.auth import mint_token
from shared.config import DEV_JWT_SECRET, ConfigError
from shared.devstack import jwt_secret_in_force

pytestmark = pytest.mark.unit


def test_token_secret_is_hostiso_jwt_secret_when_it_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "operator-chosen-secret-0123456789abcdef"
    monkeypatch.setenv("HOSTISO_JWT_SECRET", secret)
    assert jwt_secret_in_force() == secret
    token = mint_token(jwt_secret_in_force(), sub="dev-soc", role="soc")
    jwt.decode(token, secret, algorithms=["HS256"], options={"verify_aud": False})
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"], options={"verify_aud": False})


def test_token_secret_is_the_dev_default_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTISO_JWT_SECRET", raising=False)
    assert jwt_secret_in_force() == DEV_JWT_SECRET


def test_a_secret_the_services_would_refuse_stops_make_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTISO_JWT_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 32"):
        jwt_secret_in_force()
