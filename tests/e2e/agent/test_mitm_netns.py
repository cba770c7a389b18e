"""A man in the middle between a real agent process and its enforcer cannot open an isolated host.

Issue 10, finding 1 (DESIGN.md §6, guarantee 11). The agent runs in namespace ``host`` and
enforces with nftables; it reaches the enforcer (the fake one, signing with a real key) only
through an in-test proxy that the test turns hostile once the host is strictly isolated: it
answers 401, serves another signing key and a release signed with it, forges an enrollment
answer naming another account's endpoint, and replays genuine policies that are not this
host's to apply. The proxy is the worst case of the network: it talks plain http in dev mode,
so it sees and changes everything (TLS would keep it out; this test is about what is left when
it does not). After each attack the RMM stays blocked and the refusal is reported or logged.

Topology (addresses from the 198.18.0.0/15 benchmarking range):

    root namespace (fake enforcer, proxy on 198.18.1.1) ── veth ── ns `host` 198.18.1.2 (agent)
                                                           198.18.0.1 ── veth ── ns `peer`
                                                           RMM 198.18.0.20, unlisted 198.18.0.30
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from shared.infra.proc import free_port
from tests.helpers import wait_for
from tests.integration.agent.fake_enforcer import FakeEnforcer
from tests.netns import (
    PEER_PORT,
    PLATFORM_ROOT,
    UNLISTED,
    PlatformLab,
    platform_lab,
    requires_netns,
)
from tests.unit.agent.policies import TestSigner, make_policy

ROOT = Path(__file__).resolve().parents[3]
RMM = "198.18.0.20"
RESOLVER = "198.18.0.53"
ACCOUNT = "acct-1"

pytestmark = requires_netns


Override = Callable[[], Response]


def _json(status: int, body: object) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _problem(status: int) -> Response:
    return Response(
        json.dumps({"type": "about:blank", "title": "nope", "status": status}),
        status_code=status,
        media_type="application/problem+json",
    )


class Mitm:
    """A relay to the enforcer whose answers per route the test can replace."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.overrides: dict[str, Override] = {}
        self.seen: list[tuple[str, str]] = []  # (route kind, path)
        self.enroll_bodies: list[dict[str, Any]] = []
        self._http = httpx.AsyncClient(timeout=60)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def kind(path: str) -> str:
        if path == "/v1/agents/enroll":
            return "enroll"
        if path == "/v1/signing-key":
            return "key"
        if path.endswith("/policy"):
            return "poll"
        if path.endswith("/policy-status"):
            return "report"
        return "other"

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.seen if k == kind)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def relay(path: str, request: Request) -> Response:
            kind = self.kind("/" + path)
            body = await request.body()
            self.seen.append((kind, "/" + path))
            if kind == "enroll":
                self.enroll_bodies.append(json.loads(body))
            override = self.overrides.get(kind)
            if override is not None:
                return override()
            headers = {
                k: v for k, v in request.headers.items() if k in ("authorization", "content-type")
            }
            upstream = await self._http.request(
                request.method,
                f"{self.upstream}/{path}",
                params=dict(request.query_params),
                content=body,
                headers=headers,
            )
            return Response(
                upstream.content,
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
            )

        return app

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app(), host=PLATFORM_ROOT, port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve())
        server, task = self._server, self._task

        def started() -> bool:
            if task.done():
                task.result()
            return server.started

        await wait_for(started, timeout=10, message="proxy started")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            await asyncio.wait_for(self._task, 15)
        await self._http.aclose()


@pytest.fixture
def lab() -> Iterator[PlatformLab]:
    with platform_lab(PlatformLab("m", RMM)) as net:
        yield net


@pytest.fixture
async def enforcer() -> AsyncIterator[FakeEnforcer]:
    fake = FakeEnforcer(TestSigner())
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def mitm(lab: PlatformLab, enforcer: FakeEnforcer) -> AsyncIterator[Mitm]:
    proxy = Mitm(enforcer.url)
    await proxy.start()
    yield proxy
    # Answer the agent's waiting long polls now so the server stops at once.
    enforcer.closing = True
    enforcer.changed.set()
    await proxy.stop()


def _reports(enforcer: FakeEnforcer, agent_id: str, **match: Any) -> list[dict[str, Any]]:
    return [
        r for r in enforcer.reports_for(agent_id) if all(r.get(k) == v for k, v in match.items())
    ]


async def test_man_in_the_middle_cannot_open_a_strictly_isolated_host(
    lab: PlatformLab, enforcer: FakeEnforcer, mitm: Mitm, tmp_path: Path
) -> None:
    state_dir, log_path = tmp_path / "agent-state", tmp_path / "agent.log"
    key_file = tmp_path / "enrollment.key"
    key_file.write_text(FakeEnforcer.ENROLLMENT_KEY)
    key_file.chmod(0o600)
    agent = lab.spawn(
        ["ip", "netns", "exec", lab.host, sys.executable, "-m", "agent", "--dev",
         "--enforcer-url", f"http://{PLATFORM_ROOT}:{mitm.port}", "--account-id", ACCOUNT,
         "--enrollment-key-file", str(key_file), "--hostname", "mitm-host",
         "--state-dir", str(state_dir), "--platform-addresses", PLATFORM_ROOT,
         "--dns-resolvers", RESOLVER, "--negative-probe", f"{UNLISTED}:{PEER_PORT}",
         "--poll-wait", "2", "--reenroll-after", "2", "--backoff-cap", "0.5",
         "--no-log-json"],
        stdout=open(log_path, "w"),  # noqa: ASYNC230, SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )  # fmt: skip

    def alive() -> None:
        if agent.poll() is not None:
            raise AssertionError(f"agent exited: {log_path.read_text()[-3000:]}")

    def held(phase: str) -> None:
        alive()
        assert lab.table_exists(), f"{phase}: the agent's table is gone"
        assert lab.reachability(mitm.port) == {
            "platform": True,
            "rmm": False,
            "unlisted": False,
        }, f"{phase}: the strict isolation did not hold"

    async def report(**match: Any) -> dict[str, Any]:
        alive()
        found = await wait_for(lambda: _reports(enforcer, agent_id, **match), timeout=30)
        return found[0]

    # Honest network: enroll (dev mode pins the key once), standard, then strict isolation.
    agent_id: str = await wait_for(
        lambda: (alive(), next(iter(enforcer.tokens), None))[1], timeout=30, message="enrolled"
    )
    genuine = enforcer.signer
    standard = genuine.sign(
        make_policy(endpoint_id=agent_id, sequence=1, allowed=(RMM,), platform=(PLATFORM_ROOT,))
    )
    enforcer.publish(agent_id, standard)
    await report(sequence=1, status="applied")
    assert lab.reachability(mitm.port) == {"platform": True, "rmm": True, "unlisted": False}
    enforcer.publish(
        agent_id,
        genuine.sign(
            make_policy(endpoint_id=agent_id, sequence=2, mode="strict", platform=(PLATFORM_ROOT,))
        ),
    )
    await report(sequence=2, status="applied")
    held("strict isolation")
    assert mitm.count("key") == 1

    # 1. Every poll and report answered 401, re-enrollment refused.
    mitm.overrides = {"poll": lambda: _problem(401), "report": lambda: _problem(401)}
    mitm.overrides["enroll"] = lambda: _problem(403)
    enrolls = mitm.count("enroll")
    await wait_for(lambda: mitm.count("enroll") > enrolls, timeout=30, message="re-enrollment")
    assert mitm.enroll_bodies[-1]["endpoint_id"] == agent_id
    held("401 on every poll")

    # 2. Another signing key, and a release signed with it.
    attacker = TestSigner()
    forged_release = attacker.sign(
        make_policy(endpoint_id=agent_id, sequence=100, mode="none", platform=(PLATFORM_ROOT,))
    )
    mitm.overrides = {
        "key": lambda: _json(
            200,
            {"key_id": attacker.key_id, "algorithm": "Ed25519", "public_key": attacker.public_b64},
        ),
        "poll": lambda: _json(200, json.loads(forged_release.model_dump_json())),
    }
    refused = await report(sequence=100, status="failed")
    assert attacker.key_id in refused["detail"]
    held("release signed with another key")

    # 3. A forged enrollment answer naming a genuine endpoint of another account, whose
    # genuine release is then served to this agent.
    async with httpx.AsyncClient() as http:
        enrolled = await http.post(
            f"{enforcer.url}/v1/agents/enroll",
            json={"account_id": "acct-2", "enrollment_key": FakeEnforcer.ENROLLMENT_KEY,
                  "hostname": "victim", "platform": "linux"},
        )  # fmt: skip
    other = enrolled.json()
    other_release = genuine.sign(
        make_policy(endpoint_id=other["agent_id"], account_id="acct-2", sequence=50, mode="none")
    )
    enforcer.publish(other["agent_id"], other_release)
    mitm.overrides = {"poll": lambda: _problem(401), "enroll": lambda: _json(200, other)}
    enrolls = mitm.count("enroll")
    await wait_for(lambda: mitm.count("enroll") > enrolls, timeout=30, message="forged answer")
    await wait_for(
        lambda: "ALARM enrollment answer names endpoint" in log_path.read_text(), timeout=15
    )
    mitm.overrides = {"poll": lambda: _json(200, json.loads(other_release.model_dump_json()))}
    refused = await report(sequence=50, status="failed")
    assert "acct-2" in refused["detail"]
    held("forged enrollment answer")

    # 4. Replays: this host's older standard policy (it would let the RMM in), and a genuine
    # release of another endpoint of the same account.
    mitm.overrides = {"poll": lambda: _json(200, json.loads(standard.model_dump_json()))}
    refused = await report(sequence=1, status="failed")
    assert "not above" in refused["detail"]
    held("replayed older policy")
    neighbour_release = genuine.sign(
        make_policy(endpoint_id="ep-neighbour", sequence=101, mode="none")
    )
    mitm.overrides = {"poll": lambda: _json(200, json.loads(neighbour_release.model_dump_json()))}
    refused = await report(sequence=101, status="failed")
    assert "ep-neighbour" in refused["detail"]
    held("release of another endpoint")

    # Nothing the proxy said reached the agent's identity, key or fence; no poll or report ever
    # went out as the other endpoint.
    assert mitm.count("key") == 1
    assert all(other["agent_id"] not in path for _, path in mitm.seen)
    assert enforcer.reports_for(other["agent_id"]) == []
    stored = json.loads((state_dir / "agent-state.json").read_text())
    assert stored["agent_id"] == agent_id and stored["signing_key"] == genuine.public_b64
    assert stored["verified_sequence"] == 2
    log = log_path.read_text()
    assert "ALARM enforcer rejected this agent" in log and "policy refused" in log

    # The honest network again: a genuine release, next sequence, opens the host.
    mitm.overrides = {}
    enforcer.publish(
        agent_id,
        genuine.sign(make_policy(endpoint_id=agent_id, sequence=3, mode="none")),
    )
    await report(sequence=3, status="applied")
    assert lab.reachability(mitm.port) == {"platform": True, "rmm": True, "unlisted": True}
    assert not lab.table_exists()
