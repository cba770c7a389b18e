"""JWT bearer auth shared by the REST APIs: HS256 tokens with ``sub``, ``role``, ``account_id``.

Every token also carries ``iat``, ``exp`` and ``aud`` (a list of the services it is for); its
lifetime (``exp - iat``) is bounded per role; a ``service`` token names what it may do in its
``scope`` claim (space-separated, as in RFC 8693/9068).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from shared.messages import Actor, Role

ALGORITHM = "HS256"
_bearer = HTTPBearer(auto_error=False)

AUDIENCE_SETTINGS = "hostiso-settings"
AUDIENCE_ISOLATION = "hostiso-isolation"
AUDIENCE_ENFORCER = "hostiso-enforcer"
ALL_AUDIENCES: tuple[str, ...] = (AUDIENCE_SETTINGS, AUDIENCE_ISOLATION, AUDIENCE_ENFORCER)

# What a ``service`` principal may do; user roles (partner, soc) are not scoped.
SCOPE_ALLOWLIST_READ = "allowlist:read"
SCOPE_ALLOWLIST_WRITE = "allowlist:write"
SCOPE_ENROLLMENT_KEY_READ = "enrollment-key:read"
SCOPE_ISOLATION_READ = "isolation:read"
SCOPE_ISOLATION_WRITE = "isolation:write"

DEFAULT_MAX_LIFETIME_S = 24 * 3600
DEFAULT_SERVICE_MAX_LIFETIME_S = 3600
# Clocks of the minting and the checking host may differ a little, never by minutes.
IAT_LEEWAY_S = 30

# Where a validated principal is left for the route's dependency (see shared.http.AuthGate).
PRINCIPAL_SCOPE_KEY = "hostiso.principal"


class Principal(Actor):
    """The authenticated caller of a request."""

    scopes: frozenset[str] = frozenset()

    def may_touch_account(self, account_id: str) -> bool:
        return self.role in ("soc", "service") or self.account_id == account_id

    def has_scope(self, scope: str) -> bool:
        """User roles are not scoped; a service principal only does what its token names."""
        return self.role != "service" or scope in self.scopes


@dataclass(frozen=True)
class TokenPolicy:
    """How one service checks tokens: its secret, its audience and the lifetime bounds."""

    secret: str
    audience: str
    max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S
    service_max_lifetime_s: int = DEFAULT_SERVICE_MAX_LIFETIME_S
    iat_leeway_s: int = IAT_LEEWAY_S

    def max_lifetime_for(self, role: str) -> int:
        if role == "service":
            return min(self.service_max_lifetime_s, self.max_lifetime_s)
        return self.max_lifetime_s


def mint_token(
    secret: str,
    *,
    sub: str,
    role: Role,
    account_id: str | None = None,
    ttl_s: int = 3600,
    audience: Iterable[str] = ALL_AUDIENCES,
    scopes: Iterable[str] = (),
) -> str:
    """A signed HS256 token; partners must carry their ``account_id``."""
    if role == "partner" and not account_id:
        raise ValueError("a partner token needs an account_id")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": sub,
        "role": role,
        "iat": now,
        "exp": now + ttl_s,
        "aud": list(audience),
    }
    if account_id:
        claims["account_id"] = account_id
    scope = " ".join(sorted(set(scopes)))
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def service_call_token(secret: str, *, sub: str, audience: str, scope: str) -> str:
    """A short-lived service token for one service-to-service call: one audience, one scope."""
    return mint_token(
        secret, sub=sub, role="service", ttl_s=300, audience=[audience], scopes=[scope]
    )


class TokenError(Exception):
    """The token is missing, expired, forged, too long-lived, for another service or incomplete."""


def decode_token(policy: TokenPolicy, token: str) -> Principal:
    """The principal of a valid token, or a :class:`TokenError` naming the rule it breaks."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            policy.secret,
            algorithms=[ALGORITHM],
            audience=policy.audience,
            leeway=policy.iat_leeway_s,
            options={"require": ["sub", "role", "iat", "exp", "aud"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("token expired") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"invalid token: the {exc.claim} claim is required") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenError(
            f"invalid token: aud must include {policy.audience!r} (this service)"
        ) from exc
    except jwt.ImmatureSignatureError as exc:
        raise TokenError(
            f"invalid token: iat is in the future (more than {policy.iat_leeway_s}s ahead)"
        ) from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"invalid token: {exc}") from exc
    role = str(claims["role"])
    lifetime = int(claims["exp"]) - int(claims["iat"])
    max_lifetime = policy.max_lifetime_for(role)
    if lifetime > max_lifetime:
        raise TokenError(
            f"invalid token: lifetime (exp - iat) of {lifetime}s exceeds the maximum of "
            f"{max_lifetime}s for role {role!r}"
        )
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise TokenError("invalid token: scope must be a space-separated string")
    try:
        principal = Principal(
            sub=str(claims["sub"]),
            role=claims["role"],
            account_id=claims.get("account_id"),
            scopes=frozenset(scope.split()),
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
    checked = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(checked, Principal):
        # The auth gate already validated this request's token, before its body was read.
        return checked
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing bearer token (Authorization: Bearer <JWT>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    policy: TokenPolicy = request.app.state.token_policy
    try:
        return decode_token(policy, credentials.credentials)
    except TokenError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from exc


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_scope(principal: Principal, scope: str) -> None:
    """403 when a service principal's token does not grant ``scope`` (RFC 6750 §3.1)."""
    if not principal.has_scope(scope):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"insufficient scope: this service token needs the {scope!r} scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
        )


def scoped_principal(scope: str) -> Any:
    """A dependency: the current principal, refused with 403 if a service token lacks ``scope``."""

    def dependency(principal: CurrentPrincipal) -> Principal:
        require_scope(principal, scope)
        return principal

    return Depends(dependency)
