"""JWT bearer auth shared by the REST APIs: HS256 tokens with ``sub``, ``role``, ``account_id``."""

from __future__ import annotations

import time
from typing import Annotated

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from shared.messages import Actor, Role

ALGORITHM = "HS256"
_bearer = HTTPBearer(auto_error=False)


class Principal(Actor):
    """The authenticated caller of a request."""

    def may_touch_account(self, account_id: str) -> bool:
        return self.role in ("soc", "service") or self.account_id == account_id


def mint_token(
    secret: str, *, sub: str, role: Role, account_id: str | None = None, ttl_s: int = 3600
) -> str:
    """A signed HS256 token; partners must carry their ``account_id``."""
    if role == "partner" and not account_id:
        raise ValueError("a partner token needs an account_id")
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}
    if account_id:
        claims["account_id"] = account_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenError(Exception):
    """The token is missing, expired, forged or lacks a required claim."""


def decode_token(secret: str, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "role", "exp"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"invalid token: {exc}") from exc
    try:
        principal = Principal(
            sub=str(claims["sub"]), role=claims["role"], account_id=claims.get("account_id")
        )
    except ValidationError as exc:
        raise TokenError("invalid token: role must be partner, soc or service") from exc
    if principal.role == "partner" and not principal.account_id:
        raise TokenError("invalid token: a partner token needs the account_id claim")
    return principal


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """FastAPI dependency: 401 unless a valid bearer token is presented."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing bearer token (Authorization: Bearer <JWT>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    secret: str = request.app.state.jwt_secret
    try:
        return decode_token(secret, credentials.credentials)
    except TokenError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from exc


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
