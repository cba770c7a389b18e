"""Micro-profile of a simulated agent's CPU per applied policy, without Kafka, Redis or sockets.

``python -m tools.agent_cpu [--agents N] [--policies K] [--profile]`` runs N ``AgentLoop``s of
the simulated path (``SimulatedFirewall``, non-durable ``StateStore``, the real
``EnforcerClient``) against an in-memory enforcer that hands each agent K signed policies
(standard isolations with the bench's allowlist size, and releases, alternately) as the
enforcer's wire bytes, and takes their status reports. It prints the process CPU time per
applied policy (``time.process_time``), so a change to the agent's per-policy work can be
measured in seconds instead of a full ``python -m bench`` run. The HTTP transport itself
(``agent.lighthttp``) is not in the figure: the answers are handed over as bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.client import EnforcerClient
from agent.firewall import SimulatedFirewall
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
        path = url.split("://", 1)[1].split("/", 1)[1]
        parts = path.split("/")
        if path == "v1/agents/enroll":
            endpoint_id = f"ep-{len(self.mailboxes)}"
            self.mailboxes[endpoint_id] = Mailbox(self._policies(endpoint_id))
            self.expected_reports += self.policies_per_agent
            return Answer(200, orjson.dumps({"agent_id": endpoint_id, "agent_token": "t"}))
        mailbox = self.mailboxes[parts[2]]
        if parts[3] == "policy":
            after = int((params or {}).get("after", 0))
            if after < len(mailbox.policies):
                return Answer(200, mailbox.policies[after])
            await self.stop.wait()
            return Answer(204)
        if parts[3] == "policy-status":
            mailbox.reported += 1
            self.reports += 1
            if self.reports >= self.expected_reports:
                self.all_reported.set()
            return Answer(200, b"{}")
        raise ValueError(f"unexpected request {method} {url}")


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
    agents: int, policies: int, directory: Path, profiler: cProfile.Profile | None = None
) -> Measurement:
    """Enroll ``agents`` (not measured), then deliver ``policies`` to each (measured)."""
    enforcer = InMemoryEnforcer(policies, Ed25519PrivateKey.generate())
    stats = AgentStats()
    loops = [
        AgentLoop(
            identity=AgentIdentity(ACCOUNT, f"host-{i}", "linux"),
            client=EnforcerClient("http://enforcer.invalid", enforcer, allow_plain_http=True),
            store=StateStore(directory / f"agent-{i}", durable=False),
            firewall=SimulatedFirewall(HostFacts(platform_addresses=("127.0.0.1",)), "hostiso"),
            enrollment_key=_enrollment_key,
            stats=stats,
            configured_key=enforcer.key,
            poll_wait=25.0,
            table_check_interval=None,
            usage_interval=None,
        )
        for i in range(agents)
    ]
    for loop in loops:
        await loop.start(enforcer.stop)  # enrolls: not part of the figure
    if profiler is not None:
        profiler.enable()
    cpu, wall = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(loop.run(enforcer.stop)) for loop in loops]
    await asyncio.wait_for(enforcer.all_reported.wait(), timeout=600)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if profiler is not None:
        profiler.disable()
    enforcer.stop.set()
    await asyncio.gather(*tasks)
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
    args = parser.parse_args(argv)
    best: Measurement | None = None
    for _ in range(args.repeat):
        # CPU time, not wall: the machine is shared, and waiting is not what is measured.
        profiler = cProfile.Profile(time.process_time) if args.profile else None
        # In RAM when possible, as the bench's work dir: the disk is not what is measured.
        shm = Path("/dev/shm")
        scratch = shm if shm.is_dir() else None
        with tempfile.TemporaryDirectory(prefix="agent-cpu-", dir=scratch) as tmp:
            result = asyncio.run(measure(args.agents, args.policies, Path(tmp), profiler))
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
