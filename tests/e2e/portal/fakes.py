"""Small in-test fakes of the settings and isolation REST APIs (DESIGN §4) for the portal's browser tests.

They implement only the routes the portal calls, with the contract's shapes, status codes and
rules that the page shows (validation messages, ETag/If-Match, tenancy, strict precedence,
frozen snapshots). The real services are tested against the same contract in their own suites.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from portal import mount_portal
from services.settings.domain import EntryRejectedError, validate_address
from shared.auth import (
    AUDIENCE_ISOLATION,
    AUDIENCE_SETTINGS,
    CurrentPrincipal,
    Principal,
    TokenPolicy,
)
from shared.infra.proc import free_port
from shared.problems import InputRejectedError, install_problem_handlers

JWT_SECRET = "portal-test-jwt-secret-0123456789abcdef"
CLOUD_RMM = (
    "cloud RMMs with dynamic addresses are not supported; "
    "use the static IPv4 address of a self-hosted server"
)
_DOTTED_QUAD = re.compile(r"^(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}$")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _invalid(field_name: str, msg: str) -> InputRejectedError:
    # Answered as the real services answer: an RFC 9457 problem naming body.<field>.
    return InputRejectedError(f"body.{field_name}", "value_error", msg)


def address_problem(address: str) -> str | None:
    """The DESIGN §7 rule an address breaks, as the API words it (a subset is enough here)."""
    if re.search(r"[a-zA-Z]", address) and ":" not in address:
        return f"address: {CLOUD_RMM}"
    if "/" in address or ":" in address:
        # Allowlist v2 forms (CIDR, IPv6): the real service's rules.
        try:
            validate_address(address)
        except EntryRejectedError as exc:
            return f"address: {exc.message}"
        return None
    if not _DOTTED_QUAD.match(address):
        return "address: must be a dotted-quad IPv4 address without leading zeros"
    ip = ipaddress.IPv4Address(address)
    if ip in ipaddress.IPv4Network("0.0.0.0/8"):
        return "address: 0.0.0.0/8 ('this network') is not a usable address"
    if ip.is_loopback:
        return "address: loopback addresses are not allowed"
    return None


class EntryIn(BaseModel):
    name: str
    address: str
    ports: list[int] = []
    protocol: str = "any"
    expires_at: str | None = None


class EntryRename(BaseModel):
    name: str


class SwitchIn(BaseModel):
    enabled: bool


class IsolateIn(BaseModel):
    mode: str
    reason: str = ""


class StrictAccountIn(BaseModel):
    reason: str = ""
    disable_allowlist: bool = True


@dataclass
class Allowlist:
    account_id: str
    enabled: bool = False
    entries: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    updated_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "enabled": self.enabled,
            "entries": self.entries,
            "version": self.version,
            "updated_at": self.updated_at,
        }


@dataclass
class Isolation:
    endpoint_id: str
    account_id: str
    state: str = "not_isolated"
    mode: str | None = None
    policy: dict[str, Any] | None = None
    desired_sequence: int = 0
    applied_sequence: int = 0
    updated_at: str | None = None
    applies_at: float = 0.0
    hostname: str = ""
    platform: str = "linux"
    enrolled_at: str = field(default_factory=_now)
    last_seen: str | None = None
    # Newest first: the policies issued, each with the agent's (simulated) answer.
    timeline: list[dict[str, Any]] = field(default_factory=list)
    fail_next: str | None = None
    # What the agent counted per allowed entry of the policy in force (DESIGN §4).
    allowlist_usage: list[dict[str, Any]] = field(default_factory=list)


class FakePlatform:
    """Shared state of both fake services: the settings store and the isolation state."""

    def __init__(self, *, apply_delay_s: float = 0.6) -> None:
        self.lock = threading.Lock()
        self.allowlists: dict[str, Allowlist] = {}
        self.isolations: dict[str, Isolation] = {}
        self.apply_delay_s = apply_delay_s
        self.if_match_seen: list[str | None] = []
        # revocation id → endpoints the fake fan-out tightened
        self.revoked: dict[str, list[str]] = {}

    def register(
        self,
        endpoint_id: str,
        account_id: str,
        *,
        hostname: str | None = None,
        platform: str = "linux",
        last_seen: str | None = None,
    ) -> None:
        self.isolations[endpoint_id] = Isolation(
            endpoint_id,
            account_id,
            hostname=hostname or f"host-{endpoint_id}",
            platform=platform,
            last_seen=last_seen,
        )

    def allowlist(self, account_id: str) -> Allowlist:
        return self.allowlists.setdefault(account_id, Allowlist(account_id))

    def bump(self, allowlist: Allowlist) -> None:
        allowlist.version += 1
        allowlist.updated_at = _now()

    def progress(self, iso: Isolation) -> Isolation:
        # Stands in for the agent's ack: the desired policy counts as applied after a delay.
        if iso.state.endswith("_pending") and time.monotonic() >= iso.applies_at:
            if iso.fail_next is not None:
                iso.state = "failed"
                iso.timeline[0].update(status="failed", reported_at=_now(), detail=iso.fail_next)
                iso.fail_next = None
                return iso
            iso.applied_sequence = iso.desired_sequence
            iso.state = "not_isolated" if iso.state == "release_pending" else "isolated"
            if iso.timeline:
                iso.timeline[0].update(status="applied", reported_at=_now())
        return iso

    def issue(self, iso: Isolation, mode: str, reason: str, by: Principal) -> None:
        allowlist = self.allowlist(iso.account_id)
        peers: list[dict[str, str]] = []
        if mode == "standard" and allowlist.enabled:
            peers = [{"name": e["name"], "address": e["address"]} for e in allowlist.entries]
        iso.desired_sequence += 1
        iso.mode = None if mode == "none" else mode
        iso.state = "release_pending" if mode == "none" else "isolation_pending"
        iso.policy = {
            "policy_id": str(uuid.uuid4()),
            "endpoint_id": iso.endpoint_id,
            "account_id": iso.account_id,
            "sequence": iso.desired_sequence,
            "mode": mode,
            "allowed_outbound": peers,
            "platform": ["127.0.0.1"],
            "settings_version": allowlist.version,
            "issued_at": _now(),
            "issued_by": by.sub,
            "reason": reason,
        }
        iso.updated_at = _now()
        iso.applies_at = time.monotonic() + self.apply_delay_s
        policy = iso.policy
        iso.timeline.insert(
            0,
            {
                "sequence": policy["sequence"],
                "policy_id": policy["policy_id"],
                "mode": mode,
                "issued_at": policy["issued_at"],
                "issued_by": by.sub,
                "reason": reason,
                "settings_version": allowlist.version,
                "request_ids": [str(uuid.uuid4())],
                "status": "pending",
                "reported_at": None,
                "detail": "",
                "rules_sha256": None,
            },
        )


def _tenant(principal: Principal, account_id: str) -> None:
    if not principal.may_touch_account(account_id):
        raise HTTPException(403, detail=f"account_id: {principal.sub} may not touch {account_id}")


def _check_if_match(platform: FakePlatform, allowlist: Allowlist, if_match: str | None) -> None:
    platform.if_match_seen.append(if_match)
    if if_match is None:
        return
    if if_match.removeprefix("W/").strip('"') != str(allowlist.version):
        raise HTTPException(
            412, detail=f"If-Match: stale version {if_match}, current is {allowlist.version}"
        )


def build_settings_app(platform: FakePlatform, *, isolation_url: str) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    app.state.token_policy = TokenPolicy(JWT_SECRET, audience=AUDIENCE_SETTINGS)
    base = "/v1/accounts/{account_id}/tooling-allowlist"

    def answer(response: Response, allowlist: Allowlist) -> dict[str, Any]:
        response.headers["ETag"] = f'"{allowlist.version}"'
        return allowlist.as_json()

    @app.get(base)
    def get_allowlist(account_id: str, who: CurrentPrincipal, response: Response) -> Any:
        _tenant(who, account_id)
        with platform.lock:
            return answer(response, platform.allowlist(account_id))

    @app.patch(base)
    def patch_allowlist(
        account_id: str,
        body: SwitchIn,
        who: CurrentPrincipal,
        response: Response,
        if_match: str | None = Header(None),
    ) -> Any:
        _tenant(who, account_id)
        with platform.lock:
            allowlist = platform.allowlist(account_id)
            _check_if_match(platform, allowlist, if_match)
            allowlist.enabled = body.enabled
            platform.bump(allowlist)
            return answer(response, allowlist)

    @app.post(base + "/entries", status_code=201)
    def add_entry(
        account_id: str,
        body: EntryIn,
        who: CurrentPrincipal,
        response: Response,
        if_match: str | None = Header(None),
    ) -> Any:
        _tenant(who, account_id)
        name = body.name.strip()
        if not 1 <= len(name) <= 64:
            raise _invalid("name", "name: must be 1–64 printable characters after trimming")
        problem = address_problem(body.address)
        if problem:
            raise _invalid("address", problem)
        with platform.lock:
            allowlist = platform.allowlist(account_id)
            _check_if_match(platform, allowlist, if_match)
            if any(e["address"] == body.address for e in allowlist.entries):
                raise HTTPException(
                    409, detail=f"address: {body.address} is already in the allowlist"
                )
            entry = {
                "id": str(uuid.uuid4()),
                "name": name,
                "address": body.address,
                "ports": sorted(body.ports),
                "protocol": body.protocol,
                "expires_at": body.expires_at,
                "created_at": _now(),
                "created_by": who.sub,
            }
            allowlist.entries.append(entry)
            platform.bump(allowlist)
            response.headers["ETag"] = f'"{allowlist.version}"'
            return entry

    @app.patch(base + "/entries/{entry_id}")
    def rename_entry(
        account_id: str,
        entry_id: str,
        body: EntryRename,
        who: CurrentPrincipal,
        response: Response,
        if_match: str | None = Header(None),
    ) -> Any:
        _tenant(who, account_id)
        name = body.name.strip()
        if not 1 <= len(name) <= 64:
            raise _invalid("name", "name: must be 1–64 printable characters after trimming")
        with platform.lock:
            allowlist = platform.allowlist(account_id)
            _check_if_match(platform, allowlist, if_match)
            for entry in allowlist.entries:
                if entry["id"] == entry_id:
                    entry["name"] = name
                    platform.bump(allowlist)
                    return answer(response, allowlist)
        raise HTTPException(404, detail=f"entry_id: no entry {entry_id}")

    @app.delete(base + "/entries/{entry_id}", status_code=204)
    def remove_entry(
        account_id: str, entry_id: str, who: CurrentPrincipal, if_match: str | None = Header(None)
    ) -> Response:
        _tenant(who, account_id)
        with platform.lock:
            allowlist = platform.allowlist(account_id)
            _check_if_match(platform, allowlist, if_match)
            kept = [e for e in allowlist.entries if e["id"] != entry_id]
            if len(kept) == len(allowlist.entries):
                raise HTTPException(404, detail=f"entry_id: no entry {entry_id}")
            allowlist.entries = kept
            platform.bump(allowlist)
        return Response(status_code=204)

    mount_portal(app, isolation_url=isolation_url)
    return app


def build_isolation_app(platform: FakePlatform, *, portal_origin: str) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    app.state.token_policy = TokenPolicy(JWT_SECRET, audience=AUDIENCE_ISOLATION)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[portal_origin],
        allow_methods=["*"],
        allow_headers=["Authorization", "Content-Type", "If-Match"],
        expose_headers=["ETag"],
    )

    def endpoint(endpoint_id: str, who: Principal) -> Isolation:
        iso = platform.isolations.get(endpoint_id)
        if iso is None:
            raise HTTPException(404, detail=f"endpoint_id: unknown endpoint {endpoint_id}")
        _tenant(who, iso.account_id)
        return platform.progress(iso)

    def as_json(iso: Isolation) -> dict[str, Any]:
        return {
            "endpoint_id": iso.endpoint_id,
            "account_id": iso.account_id,
            "state": iso.state,
            "mode": iso.mode,
            "policy": iso.policy,
            "desired_sequence": iso.desired_sequence,
            "applied_sequence": iso.applied_sequence,
            "rules_sha256": None,
            "detail": "",
            "updated_at": iso.updated_at,
            "allowlist_usage": iso.allowlist_usage,
        }

    @app.get("/v1/endpoints/{endpoint_id}/isolation")
    def get_isolation(endpoint_id: str, who: CurrentPrincipal) -> Any:
        with platform.lock:
            return as_json(endpoint(endpoint_id, who))

    @app.post("/v1/endpoints/{endpoint_id}/isolation", status_code=202)
    def isolate(endpoint_id: str, body: IsolateIn, who: CurrentPrincipal) -> Any:
        if body.mode not in ("standard", "strict"):
            raise _invalid("mode", "mode: must be standard or strict")
        with platform.lock:
            iso = endpoint(endpoint_id, who)
            isolated = iso.state in ("isolated", "isolation_pending")
            # Strict wins; repeating an isolate on an isolated endpoint changes nothing.
            if not isolated or (body.mode == "strict" and iso.mode != "strict"):
                platform.issue(iso, body.mode, body.reason, who)
        return {"request_id": str(uuid.uuid4())}

    @app.delete("/v1/endpoints/{endpoint_id}/isolation", status_code=202)
    def release(endpoint_id: str, who: CurrentPrincipal, reason: str = "") -> Any:
        with platform.lock:
            iso = endpoint(endpoint_id, who)
            if iso.mode == "strict" and who.role == "partner":
                raise HTTPException(403, detail="only the SOC may release a strict isolation")
            if iso.state in ("isolated", "isolation_pending", "failed"):
                platform.issue(iso, "none", reason, who)
        return {"request_id": str(uuid.uuid4())}

    @app.post("/v1/accounts/{account_id}/strict-isolation", status_code=202)
    def strict_account(account_id: str, body: StrictAccountIn, who: CurrentPrincipal) -> Any:
        _tenant(who, account_id)
        with platform.lock:
            covered = [
                platform.progress(iso)
                for iso in platform.isolations.values()
                if iso.account_id == account_id
                and platform.progress(iso).state in ("isolated", "isolation_pending")
            ]
            for iso in covered:
                if iso.mode != "strict":
                    platform.issue(iso, "strict", body.reason, who)
            if body.disable_allowlist:
                allowlist = platform.allowlist(account_id)
                allowlist.enabled = False
                platform.bump(allowlist)
        return {"request_id": str(uuid.uuid4()), "endpoints": len(covered)}

    @app.get("/v1/accounts/{account_id}/endpoints")
    def list_endpoints(
        account_id: str,
        who: CurrentPrincipal,
        state: str | None = None,
        q: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Any:
        _tenant(who, account_id)
        if not 1 <= limit <= 500:
            raise HTTPException(422, detail=[{"loc": ["query", "limit"], "msg": "limit: 1 to 500"}])
        start = 0
        if cursor is not None:
            if not re.fullmatch(r"c[0-9]+", cursor):
                raise HTTPException(
                    422, detail=[{"loc": ["query", "cursor"], "msg": "cursor: not a cursor"}]
                )
            start = int(cursor[1:])
        with platform.lock:
            rows = sorted(
                (
                    platform.progress(iso)
                    for iso in platform.isolations.values()
                    if iso.account_id == account_id
                ),
                key=lambda iso: (iso.hostname.lower(), iso.endpoint_id),
            )
            matching = [
                iso
                for iso in rows
                if (state is None or iso.state == state)
                and (not q or q.lower() in iso.hostname.lower())
            ]
            page = matching[start : start + limit]
            more = start + limit < len(matching)
            return {
                "items": [
                    {
                        "endpoint_id": iso.endpoint_id,
                        "hostname": iso.hostname,
                        "platform": iso.platform,
                        "enrolled_at": iso.enrolled_at,
                        "last_seen": iso.last_seen,
                        "state": iso.state,
                        "mode": iso.mode,
                        "applied_sequence": iso.applied_sequence,
                    }
                    for iso in page
                ],
                "next_cursor": f"c{start + limit}" if more else None,
            }

    @app.get("/v1/endpoints/{endpoint_id}/isolation/timeline")
    def isolation_timeline(endpoint_id: str, who: CurrentPrincipal, limit: int = 50) -> Any:
        with platform.lock:
            iso = endpoint(endpoint_id, who)
            return {"endpoint_id": endpoint_id, "items": iso.timeline[:limit]}

    @app.get("/v1/accounts/{account_id}/isolations")
    def list_isolations(account_id: str, who: CurrentPrincipal) -> Any:
        _tenant(who, account_id)
        with platform.lock:
            return {
                "account_id": account_id,
                "endpoints": [
                    as_json(iso)
                    for iso in platform.isolations.values()
                    if iso.account_id == account_id
                    and platform.progress(iso).state != "not_isolated"
                ],
            }

    return app


class ServerThread:
    """A uvicorn server on a free port in a daemon thread."""

    def __init__(self, app: FastAPI, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_fake_stack(platform: FakePlatform) -> tuple[ServerThread, ServerThread]:
    """The settings fake (serving the portal) and the isolation fake on two origins, as deployed."""
    settings_port, isolation_port = free_port(), free_port()
    settings_url = f"http://127.0.0.1:{settings_port}"
    isolation_url = f"http://127.0.0.1:{isolation_port}"
    isolation_app = build_isolation_app(platform, portal_origin=settings_url)
    settings_app = build_settings_app(platform, isolation_url=isolation_url)
    add_fleet_routes(settings_app, isolation_app, platform)
    isolation = ServerThread(isolation_app, isolation_port).start()
    settings = ServerThread(settings_app, settings_port).start()
    return settings, isolation


class ReasonIn(BaseModel):
    reason: str = ""


def add_fleet_routes(settings: FastAPI, isolation: FastAPI, platform: FakePlatform) -> None:
    """Revoke (settings), its progress, preview with diff and refresh (isolation)."""

    def peers(iso: Isolation) -> list[dict[str, Any]]:
        return list((iso.policy or {}).get("allowed_outbound") or [])

    def standard(iso: Isolation) -> bool:
        return iso.mode == "standard" and iso.state in ("isolated", "isolation_pending", "failed")

    @settings.post("/v1/accounts/{account_id}/tooling-allowlist/entries/{entry_id}/revoke")
    def revoke(account_id: str, entry_id: str, body: ReasonIn, who: CurrentPrincipal) -> Any:
        _tenant(who, account_id)
        if not body.reason.strip():
            raise _invalid("reason", "reason: say why the entry is revoked")
        with platform.lock:
            allowlist = platform.allowlist(account_id)
            entry = next((e for e in allowlist.entries if e["id"] == entry_id), None)
            if entry is None:
                raise HTTPException(404, detail=f"entry_id: no entry {entry_id}")
            allowlist.entries = [e for e in allowlist.entries if e["id"] != entry_id]
            platform.bump(allowlist)
            revocation_id = str(uuid.uuid4())
            affected = 0
            # What the isolation service's fan-out does: same mode, next sequence, without it.
            for iso in platform.isolations.values():
                iso = platform.progress(iso)
                kept = [p for p in peers(iso) if p["address"] != entry["address"]]
                if iso.account_id != account_id or not standard(iso) or kept == peers(iso):
                    continue
                affected += 1
                version = (iso.policy or {}).get("settings_version", 0)
                platform.issue(iso, "standard", body.reason, who)
                assert iso.policy is not None
                iso.policy.update(allowed_outbound=kept, settings_version=version)
                platform.revoked.setdefault(revocation_id, []).append(iso.endpoint_id)
        return JSONResponse(
            {
                "entry_id": entry_id,
                "revocation_id": revocation_id,
                "entry": entry,
                "version": allowlist.version,
                "endpoints": affected,
            },
            status_code=202,
        )

    @isolation.get("/v1/accounts/{account_id}/revocations/{revocation_id}")
    def revocation(account_id: str, revocation_id: str, who: CurrentPrincipal) -> Any:
        _tenant(who, account_id)
        with platform.lock:
            tightened = [
                platform.progress(platform.isolations[e])
                for e in platform.revoked.get(revocation_id, [])
            ]
            applied = sum(1 for iso in tightened if iso.state == "isolated")
        return {
            "account_id": account_id,
            "revocation_id": revocation_id,
            "endpoints": len(tightened),
            "tightened": len(tightened),
            "applied": applied,
            "failed": 0,
        }

    @isolation.get("/v1/endpoints/{endpoint_id}/isolation/preview")
    def preview(endpoint_id: str, who: CurrentPrincipal) -> Any:
        with platform.lock:
            iso = platform.isolations.get(endpoint_id)
            if iso is None:
                raise HTTPException(404, detail=f"endpoint_id: unknown endpoint {endpoint_id}")
            _tenant(who, iso.account_id)
            allowlist = platform.allowlist(iso.account_id)
            now = [
                {"name": e["name"], "address": e["address"]}
                for e in (allowlist.entries if allowlist.enabled else [])
            ]
            before = peers(iso) if standard(iso) else []
            frozen = {p["address"] for p in before}
            current = {p["address"] for p in now}
            return {
                "endpoint_id": endpoint_id,
                "mode": "standard",
                "policy": iso.policy,
                "diff": {
                    "added": [p for p in now if p["address"] not in frozen]
                    if standard(iso)
                    else [],
                    "removed": [p for p in before if p["address"] not in current],
                },
                "current_settings_version": allowlist.version,
            }

    @isolation.post("/v1/endpoints/{endpoint_id}/isolation/refresh", status_code=202)
    def refresh(endpoint_id: str, body: ReasonIn, who: CurrentPrincipal) -> Any:
        with platform.lock:
            iso = platform.isolations.get(endpoint_id)
            if iso is None:
                raise HTTPException(404, detail=f"endpoint_id: unknown endpoint {endpoint_id}")
            _tenant(who, iso.account_id)
            if not standard(platform.progress(iso)):
                raise HTTPException(409, detail="only a standard isolation can be refreshed")
            platform.issue(iso, "standard", body.reason, who)
        return {"request_id": str(uuid.uuid4())}
