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
agents pay for; ``--tls`` puts that server behind TLS, as the enforcer is.

Two more figures, both over HTTP: ``--idle-polls SECONDS`` runs ``--agents`` idle agents whose
polls the stub answers 204 after ``--idle-hold`` seconds, for SECONDS, and prints the CPU per
idle poll and the RSS per idle agent; ``--idle N`` adds N idle agents (same 204 answers) to the
policy run, the bench's situation (the bench divides all its agents' CPU, idle polls included,
by the policies applied).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import gzip
import multiprocessing
import os
import pstats
import socket
import ssl
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
from agent.bootstrap import tls_context, tune_fleet_process
from agent.client import EnforcerClient
from agent.firewall import SimulatedFirewall
from agent.lighthttp import LightHttpClient
from agent.loop import AgentIdentity, AgentLoop
from agent.state import StateStore
from agent.verification import PinnedKey, key_id_of
from shared.devstack import dev_tls
from shared.messages import AllowedPeer, FrozenPolicy, SignedPolicy, canonical_policy_bytes

ACCOUNT = "acct-micro"
ISSUED = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
# Enrolled with a host name starting so: no policies, every poll answered 204 after the hold.
IDLE_PREFIX = "idle-"


class Answer:
    """What ``EnforcerClient`` reads of an HTTP answer."""

    def __init__(self, status_code: int, content: bytes = b"") -> None:
        self.status_code = status_code
        self.content = content
        self.headers: dict[str, str] = {}

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

    def __init__(
        self,
        policies_per_agent: int,
        signer: Ed25519PrivateKey,
        idle_hold: float | None = None,
        idle_polls: Any = None,
    ) -> None:
        self.policies_per_agent = policies_per_agent
        # Seconds an exhausted poll is held before its 204 (None: until stop, never answered).
        self.idle_hold = idle_hold
        # A ``multiprocessing.Value`` counting the 204s (the server may be another process).
        self.idle_polls = idle_polls if idle_polls is not None else multiprocessing.Value("q", 0)
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

    async def answer(
        self, method: str, path: str, after: int, body: bytes = b"", wait: float = 25.0
    ) -> tuple[int, bytes]:
        """Status and body of one agent API call (the policy body as stored: not gzipped)."""
        parts = path.strip("/").split("/")
        if method == "POST" and parts == ["v1", "agents", "enroll"]:
            endpoint_id = f"ep-{len(self.mailboxes)}"
            idle = body and orjson.loads(body).get("hostname", "").startswith(IDLE_PREFIX)
            self.mailboxes[endpoint_id] = Mailbox([] if idle else self._policies(endpoint_id))
            if not idle:
                self.expected_reports += self.policies_per_agent
            return 200, orjson.dumps({"agent_id": endpoint_id, "agent_token": "t"})
        mailbox = self.mailboxes[parts[2]]
        if parts[3] == "policy":
            if after < len(mailbox.policies):
                return 200, mailbox.policies[after]
            if self.idle_hold is None:
                await self.stop.wait()
                return 204, b""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), min(wait, self.idle_hold))
            with self.idle_polls.get_lock():
                self.idle_polls.value += 1
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
        status, body = await self.answer(
            method,
            path,
            int((params or {}).get("after", 0)),
            orjson.dumps(json) if json is not None else b"",
            float((params or {}).get("wait", 25.0)),
        )
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
                request_body = await reader.readexactly(length) if length else b""
                parts = urlsplit(target)
                query = parse_qs(parts.query)
                after = int(query.get("after", ["0"])[0])
                wait = float(query.get("wait", ["25"])[0])
                status, body = await self.answer(method, parts.path, after, request_body, wait)
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


def _serve(
    listening: socket.socket,
    policies: int,
    private_key: bytes,
    tls: tuple[str, str] | None = None,
    idle_hold: float | None = None,
    idle_polls: Any = None,
) -> None:
    """The child process of ``--http``: the in-memory enforcer on ``listening`` until killed;
    ``tls``: the certificate and key files it serves with."""

    async def run() -> None:
        enforcer = InMemoryEnforcer(
            policies, Ed25519PrivateKey.from_private_bytes(private_key), idle_hold, idle_polls
        )
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
        server = await asyncio.start_server(enforcer.serve, sock=listening, ssl=context)
        await server.serve_forever()

    # Forked from inside the parent's running loop: uvloop's does not survive a fork, so the
    # stub enforcer gets a new loop of asyncio's own (it is not what is measured).
    asyncio.set_event_loop_policy(None)
    asyncio.run(run())


@dataclass(frozen=True)
class Measurement:
    agents: int
    applied: int
    cpu_seconds: float
    wall_seconds: float
    idle_agents: int = 0
    # 204 answers the idle agents had during the measured time.
    idle_polls: int = 0
    # Growth of the process's RSS per idle agent enrolled and polling (0 when not measured).
    rss_bytes_per_idle_agent: float = 0.0

    @property
    def cpu_ms_per_policy(self) -> float:
        return 1000 * self.cpu_seconds / max(self.applied, 1)

    @property
    def cpu_ms_per_idle_poll(self) -> float:
        return 1000 * self.cpu_seconds / max(self.idle_polls, 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Fleet:
    """The agents of one measurement and the enforcer they talk to (in memory or a child)."""

    def __init__(
        self,
        policies: int,
        directory: Path,
        *,
        http: bool,
        tls: bool,
        idle_hold: float | None,
    ) -> None:
        signer = Ed25519PrivateKey.generate()
        self.idle_polls = multiprocessing.get_context("fork").Value("q", 0)
        self.enforcer = InMemoryEnforcer(policies, signer, idle_hold, self.idle_polls)
        self.directory = directory
        self.http = http or tls
        self.server: multiprocessing.process.BaseProcess | None = None
        self.clients: list[LightHttpClient] = []
        self.loops: list[AgentLoop] = []
        self.stats = AgentStats()
        self.base_url = "http://enforcer.invalid"
        self.tls: ssl.SSLContext | None = None
        if not self.http:
            return
        listening = socket.create_server(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        certificate = None
        if tls:
            ca, served = dev_tls(directory / "tls")
            certificate = (str(served.cert), str(served.key))
            self.tls = tls_context(ca.cert)
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        raw = signer.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.server = multiprocessing.get_context("fork").Process(
            target=_serve,
            args=(listening, policies, raw, certificate, idle_hold, self.idle_polls),
            daemon=True,
        )
        self.server.start()
        listening.close()

    def add(self, count: int, prefix: str) -> list[AgentLoop]:
        added = []
        for _ in range(count):
            i = len(self.loops)
            transport: InMemoryEnforcer | LightHttpClient = self.enforcer
            if self.http:
                transport = LightHttpClient(self.base_url, self.tls)
                self.clients.append(transport)
            loop = AgentLoop(
                identity=AgentIdentity(ACCOUNT, f"{prefix}{i}", "linux"),
                client=EnforcerClient(self.base_url, transport, allow_plain_http=True),
                store=StateStore(self.directory / f"agent-{i}", durable=False),
                firewall=SimulatedFirewall(HostFacts(platform_addresses=("127.0.0.1",)), "hostiso"),
                enrollment_key=_enrollment_key,
                stats=self.stats,
                configured_key=self.enforcer.key,
                poll_wait=25.0,
                table_check_interval=None,
                usage_interval=None,
            )
            self.loops.append(loop)
            added.append(loop)
        return added

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        if self.server is not None:
            self.server.kill()
            self.server.join()


async def measure(
    agents: int,
    policies: int,
    directory: Path,
    profiler: cProfile.Profile | None = None,
    *,
    http: bool = False,
    tls: bool = False,
    idle: int = 0,
    idle_hold: float = 2.0,
) -> Measurement:
    """Enroll ``agents`` and ``idle`` idle ones (not measured), then deliver ``policies`` to each
    busy agent (measured; the idle ones poll meanwhile, answered 204 after ``idle_hold`` s)."""
    fleet = _Fleet(policies, directory, http=http, tls=tls, idle_hold=idle_hold if idle else None)
    stats = fleet.stats
    stop = fleet.enforcer.stop
    busy = fleet.add(agents, "host-")
    idlers = fleet.add(idle, IDLE_PREFIX)
    tasks: list[asyncio.Task[None]] = []
    try:
        for loop in busy + idlers:
            await loop.start(stop)  # enrolls: not part of the figure
        # The idle agents are polling before the measured time starts.
        tasks += [asyncio.create_task(loop.run(stop)) for loop in idlers]
        await asyncio.sleep(0)
        if profiler is not None:
            profiler.enable()
        idle_polls = fleet.idle_polls.value
        cpu, wall = time.process_time(), time.perf_counter()
        tasks += [asyncio.create_task(loop.run(stop)) for loop in busy]
        deadline = time.monotonic() + 600
        # Every policy applied and its report taken (the report clears the pending one).
        while stats.applied < agents * policies or any(
            loop.state.pending_report is not None for loop in busy
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"applied {stats.applied} of {agents * policies}: {stats}")
            await asyncio.sleep(0.01)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        idle_polls = fleet.idle_polls.value - idle_polls
        if profiler is not None:
            profiler.disable()
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await fleet.close()
    if stats.applied != agents * policies:
        raise RuntimeError(f"applied {stats.applied} of {agents * policies}: {stats}")
    return Measurement(agents, stats.applied, cpu, wall, idle, idle_polls)


async def measure_idle(
    agents: int,
    seconds: float,
    directory: Path,
    profiler: cProfile.Profile | None = None,
    *,
    hold: float = 0.5,
    tls: bool = True,
) -> Measurement:
    """``agents`` idle agents over HTTP (TLS by default) whose polls are answered 204 after
    ``hold`` s: the CPU per idle poll over ``seconds`` (after one warm-up hold), and the RSS
    grown per agent from before the first one was built to the end of the measured time."""
    rss = _rss_bytes()
    fleet = _Fleet(0, directory, http=True, tls=tls, idle_hold=hold)
    stop = fleet.enforcer.stop
    idlers = fleet.add(agents, IDLE_PREFIX)
    tasks: list[asyncio.Task[None]] = []
    try:
        for loop in idlers:
            await loop.start(stop)
        tasks = [asyncio.create_task(loop.run(stop)) for loop in idlers]
        await asyncio.sleep(hold * 2)  # every agent has had a poll answered and polls again
        if profiler is not None:
            profiler.enable()
        polls = fleet.idle_polls.value
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        polls = fleet.idle_polls.value - polls
        if profiler is not None:
            profiler.disable()
        grown = _rss_bytes() - rss
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await fleet.close()
    if fleet.stats.poll_errors:
        raise RuntimeError(f"idle polls failed: {fleet.stats}")
    return Measurement(0, 0, cpu, wall, agents, polls, grown / max(agents, 1))


async def _enrollment_key() -> str:
    return "e" * 64


def _line(result: Measurement) -> str:
    if result.agents == 0:
        return (
            f"idle_agents={result.idle_agents} idle_polls={result.idle_polls}"
            f" cpu={result.cpu_seconds:.3f}s wall={result.wall_seconds:.3f}s"
            f" cpu_ms_per_idle_poll={result.cpu_ms_per_idle_poll:.3f}"
            f" rss_kib_per_idle_agent={result.rss_bytes_per_idle_agent / 1024:.1f}"
        )
    idle = (
        f" idle_agents={result.idle_agents} idle_polls={result.idle_polls}"
        if result.idle_agents
        else ""
    )
    return (
        f"agents={result.agents} applied={result.applied}{idle} cpu={result.cpu_seconds:.3f}s"
        f" wall={result.wall_seconds:.3f}s"
        f" cpu_ms_per_applied_policy={result.cpu_ms_per_policy:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--policies", type=int, default=20, help="policies per agent")
    parser.add_argument("--repeat", type=int, default=3, help="runs; each printed, then the best")
    parser.add_argument("--profile", action="store_true", help="cProfile one run, print top 40")
    parser.add_argument(
        "--http", action="store_true", help="over HTTP/1.1 with the light client (see above)"
    )
    parser.add_argument("--tls", action="store_true", help="over HTTPS (implies --http)")
    parser.add_argument(
        "--idle", type=int, default=0, help="idle agents polling beside the busy ones (HTTP)"
    )
    parser.add_argument(
        "--idle-polls",
        type=float,
        default=None,
        metavar="SECONDS",
        help="only --agents idle agents (HTTPS unless --no-tls-idle): CPU per idle poll",
    )
    parser.add_argument(
        "--idle-hold", type=float, default=None, help="seconds before an idle poll's 204"
    )
    parser.add_argument("--no-tls-idle", action="store_true", help="--idle-polls over plain http")
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="asyncio's own loop and the default GC (simulated agents before tune_fleet_process)",
    )
    args = parser.parse_args(argv)
    if not args.untuned:
        tune_fleet_process()  # as `agent --simulated` runs (agent/cli.py)
    best: Measurement | None = None
    for _ in range(args.repeat):
        # CPU time, not wall: the machine is shared, and waiting is not what is measured.
        profiler = cProfile.Profile(time.process_time) if args.profile else None
        # In RAM when possible, as the bench's work dir: the disk is not what is measured.
        shm = Path("/dev/shm")
        scratch = shm if shm.is_dir() else None
        with tempfile.TemporaryDirectory(prefix="agent-cpu-", dir=scratch) as tmp:
            if args.idle_polls is not None:
                result = asyncio.run(
                    measure_idle(
                        args.agents,
                        args.idle_polls,
                        Path(tmp),
                        profiler,
                        hold=0.5 if args.idle_hold is None else args.idle_hold,
                        tls=not args.no_tls_idle,
                    )
                )
                better = best is None or result.cpu_ms_per_idle_poll < best.cpu_ms_per_idle_poll
            else:
                result = asyncio.run(
                    measure(
                        args.agents,
                        args.policies,
                        Path(tmp),
                        profiler,
                        http=args.http or args.idle > 0,
                        tls=args.tls,
                        idle=args.idle,
                        idle_hold=2.0 if args.idle_hold is None else args.idle_hold,
                    )
                )
                better = best is None or result.cpu_ms_per_policy < best.cpu_ms_per_policy
        sys.stdout.write(f"run: {_line(result)}\n")
        if better:
            best = result
        if profiler is not None:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(40)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(60)
            break
    assert best is not None
    sys.stdout.write(_line(best) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
