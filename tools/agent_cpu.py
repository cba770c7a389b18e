"""Micro-profile of a simulated agent's CPU per applied policy, without Kafka, Redis or sockets.

``python -m tools.agent_cpu [--agents N] [--policies K] [--profile]`` runs N ``AgentLoop``s of
the simulated path (``SimulatedFirewall``, non-durable ``StateStore``, the real
``EnforcerClient``) against an in-memory enforcer that hands each agent K signed policies
(standard isolations with the bench's allowlist size, and releases, alternately) as the
enforcer's wire bytes, and takes their status reports. It prints the process CPU time per
applied policy (``time.process_time``), so a change to the agent's per-policy work can be
measured in seconds instead of a full ``python -m bench`` run. By default the answers are
handed over as bytes (no HTTP); ``--http`` serves the same enforcer over HTTP/1.1 from a child
process (gzipped policies, as the enforcer serves them) and gives each agent the simulated
agents' own client (``agent.lighthttp``), so the figure also holds the transport the bench's
agents pay for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gzip
import multiprocessing
import pstats
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.client import EnforcerClient
from agent.firewall import SimulatedFirewall
from agent.lighthttp import LightHttpClient
from agent.loop import AgentIdentity, AgentLoop
from agent.state import StateStore
from agent.verification import PinnedKey, key_id_of
from shared.messages import AllowedPeer, FrozenPolicy, SignedPolicy, canonical_policy_bytes

ACCOUNT = "acct-micro"
ISSUED = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Answer:
    """What ``EnforcerClient`` reads of an HTTP answer."""

    def __init__(self, status_code: int, content: bytes = b"") -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self, **_: Any) -> Any:
        return orjson.loads(self.content)


@dataclass
class Mailbox:
    """One endpoint's signed policies (wire bytes, by sequence) and how many were reported."""

    policies: list[bytes]
    reported: int = 0


class InMemoryEnforcer:
    """The agent API as the agents see it: enroll, long-poll (answered at once or held until
    stop), status reports. Policies are the bytes the enforcer stores and serves."""

    def __init__(self, policies_per_agent: int, signer: Ed25519PrivateKey) -> None:
        self.policies_per_agent = policies_per_agent
        self.signer = signer
        raw = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key = PinnedKey(raw=raw, key_id=key_id_of(raw))
        self.mailboxes: dict[str, Mailbox] = {}
        self.stop = asyncio.Event()
        self.all_reported = asyncio.Event()
        self.expected_reports = 0
        self.reports = 0

    def _sign(self, policy: FrozenPolicy) -> bytes:
        signature = base64.b64encode(self.signer.sign(canonical_policy_bytes(policy))).decode()
        signed = SignedPolicy(policy=policy, signature=signature, key_id=self.key.key_id)
        return signed.model_dump_json().encode()

    def _policies(self, endpoint_id: str) -> list[bytes]:
        policies = []
        for sequence in range(1, self.policies_per_agent + 1):
            standard = sequence % 2 == 1
            policy = FrozenPolicy(
                policy_id=f"pol-{endpoint_id}-{sequence}",
                endpoint_id=endpoint_id,
                account_id=ACCOUNT,
                sequence=sequence,
                mode="standard" if standard else "none",
                allowed_outbound=tuple(
                    AllowedPeer(name=f"RMM {i}", address=f"203.0.113.{10 + i}") for i in range(5)
                )
                if standard
                else (),
                platform=("127.0.0.1",),
                settings_version=3,
                issued_at=ISSUED,
                issued_by="soc-analyst",
                reason="micro-profile",
            )
            policies.append(self._sign(policy))
        return policies

    async def answer(self, method: str, path: str, after: int) -> tuple[int, bytes]:
        """Status and body of one agent API call (the policy body as stored: not gzipped)."""
        parts = path.strip("/").split("/")
        if method == "POST" and parts == ["v1", "agents", "enroll"]:
            endpoint_id = f"ep-{len(self.mailboxes)}"
            self.mailboxes[endpoint_id] = Mailbox(self._policies(endpoint_id))
            self.expected_reports += self.policies_per_agent
            return 200, orjson.dumps({"agent_id": endpoint_id, "agent_token": "t"})
        mailbox = self.mailboxes[parts[2]]
        if parts[3] == "policy":
            if after < len(mailbox.policies):
                return 200, mailbox.policies[after]
            await self.stop.wait()
            return 204, b""
        if parts[3] == "policy-status":
            mailbox.reported += 1
            self.reports += 1
            if self.reports >= self.expected_reports:
                self.all_reported.set()
            return 200, b"{}"
        raise ValueError(f"unexpected request {method} {path}")

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        timeout: float,
        json: Any,
        params: Mapping[str, int | float] | None,
    ) -> Answer:
        """``HttpRequester``: the in-memory path, no HTTP."""
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        status, body = await self.answer(method, path, int((params or {}).get("after", 0)))
        return Answer(status, body)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive HTTP/1.1 connection (``--http``); policies go gzipped, as stored."""
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                parts = urlsplit(target)
                after = int(parse_qs(parts.query).get("after", ["0"])[0])
                status, body = await self.answer(method, parts.path, after)
                extra = ""
                if status == 200 and body.startswith(b'{"policy"'):
                    body, extra = gzip.compress(body, 6, mtime=0), "Content-Encoding: gzip\r\n"
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def _serve(listening: socket.socket, policies: int, private_key: bytes) -> None:
    """The child process of ``--http``: the in-memory enforcer on ``listening`` until killed."""

    async def run() -> None:
        enforcer = InMemoryEnforcer(policies, Ed25519PrivateKey.from_private_bytes(private_key))
        server = await asyncio.start_server(enforcer.serve, sock=listening)
        await server.serve_forever()

    asyncio.run(run())


@dataclass(frozen=True)
class Measurement:
    agents: int
    applied: int
    cpu_seconds: float
    wall_seconds: float

    @property
    def cpu_ms_per_policy(self) -> float:
        return 1000 * self.cpu_seconds / max(self.applied, 1)


async def measure(
    agents: int,
    policies: int,
    directory: Path,
    profiler: cProfile.Profile | None = None,
    *,
    http: bool = False,
) -> Measurement:
    """Enroll ``agents`` (not measured), then deliver ``policies`` to each (measured)."""
    signer = Ed25519PrivateKey.generate()
    enforcer = InMemoryEnforcer(policies, signer)
    server: multiprocessing.process.BaseProcess | None = None
    clients: list[LightHttpClient] = []
    base_url = "http://enforcer.invalid"
    if http:
        listening = socket.create_server(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        raw = signer.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        server = multiprocessing.get_context("fork").Process(
            target=_serve, args=(listening, policies, raw), daemon=True
        )
        server.start()
        listening.close()
    stats = AgentStats()
    loops = []
    for i in range(agents):
        transport: InMemoryEnforcer | LightHttpClient = enforcer
        if http:
            transport = LightHttpClient(base_url, None)
            clients.append(transport)
        loops.append(
            AgentLoop(
                identity=AgentIdentity(ACCOUNT, f"host-{i}", "linux"),
                client=EnforcerClient(base_url, transport, allow_plain_http=True),
                store=StateStore(directory / f"agent-{i}", durable=False),
                firewall=SimulatedFirewall(HostFacts(platform_addresses=("127.0.0.1",)), "hostiso"),
                enrollment_key=_enrollment_key,
                stats=stats,
                configured_key=enforcer.key,
                poll_wait=25.0,
                table_check_interval=None,
                usage_interval=None,
            )
        )
    stop = enforcer.stop
    try:
        for loop in loops:
            await loop.start(stop)  # enrolls: not part of the figure
        if profiler is not None:
            profiler.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(loop.run(stop)) for loop in loops]
        deadline = time.monotonic() + 600
        # Every policy applied and its report taken (the report clears the pending one).
        while stats.applied < agents * policies or any(
            loop.state.pending_report is not None for loop in loops
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"applied {stats.applied} of {agents * policies}: {stats}")
            await asyncio.sleep(0.01)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if profiler is not None:
            profiler.disable()
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.aclose()
        if server is not None:
            server.kill()
            server.join()
    if stats.applied != agents * policies:
        raise RuntimeError(f"applied {stats.applied} of {agents * policies}: {stats}")
    return Measurement(agents, stats.applied, cpu, wall)


async def _enrollment_key() -> str:
    return "e" * 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--policies", type=int, default=20, help="policies per agent")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best one is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile one run, print top 40")
    parser.add_argument(
        "--http", action="store_true", help="over HTTP/1.1 with the light client (see above)"
    )
    args = parser.parse_args(argv)
    best: Measurement | None = None
    for _ in range(args.repeat):
        # CPU time, not wall: the machine is shared, and waiting is not what is measured.
        profiler = cProfile.Profile(time.process_time) if args.profile else None
        # In RAM when possible, as the bench's work dir: the disk is not what is measured.
        shm = Path("/dev/shm")
        scratch = shm if shm.is_dir() else None
        with tempfile.TemporaryDirectory(prefix="agent-cpu-", dir=scratch) as tmp:
            result = asyncio.run(
                measure(args.agents, args.policies, Path(tmp), profiler, http=args.http)
            )
        if best is None or result.cpu_ms_per_policy < best.cpu_ms_per_policy:
            best = result
        if profiler is not None:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(40)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(60)
            break
    assert best is not None
    sys.stdout.write(
        f"agents={best.agents} applied={best.applied} cpu={best.cpu_seconds:.3f}s"
        f" wall={best.wall_seconds:.3f}s cpu_ms_per_applied_policy={best.cpu_ms_per_policy:.3f}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
