"""The agent's enroll / long-poll / verify / apply / report loop against a fake enforcer."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.bootstrap import AgentConfig, run_agents
from agent.client import EnforcerClient
from agent.firewall import SimulatedFirewall
from agent.loop import AgentIdentity, AgentLoop
from agent.nft import render_ruleset, rules_sha256
from agent.state import StateStore
from tests.helpers import wait_for
from tests.integration.agent.fake_enforcer import FakeEnforcer
from tests.unit.agent.policies import TestSigner, make_policy

FACTS = HostFacts(platform_addresses=("198.51.100.9",), dns_resolvers=("192.0.2.53",))


@pytest.fixture
async def enforcer() -> AsyncIterator[FakeEnforcer]:
    fake = FakeEnforcer(TestSigner())
    await fake.start()
    yield fake
    await fake.stop()


class RunningAgent:
    """An AgentLoop run as a task, with its stop switch."""

    def __init__(self, enforcer: FakeEnforcer, state_dir: Path, http: httpx.AsyncClient) -> None:
        self.stats = AgentStats()
        self.loop = AgentLoop(
            identity=AgentIdentity("acct-1", "web-01", "linux"),
            client=EnforcerClient(enforcer.url, http, allow_plain_http=True),
            store=StateStore(state_dir),
            firewall=SimulatedFirewall(FACTS, "hostiso"),
            enrollment_key=self._key,
            stats=self.stats,
            dev_mode=True,
            poll_wait=5.0,
            table_check_interval=None,
            backoff_cap=0.2,
            reenroll_after=2,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @staticmethod
    async def _key() -> str:
        return FakeEnforcer.ENROLLMENT_KEY

    def start(self) -> RunningAgent:
        self.task = asyncio.create_task(self.loop.run(self.stop))
        return self

    async def halt(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def _enrolled(agent: RunningAgent) -> str:
    # Persisted, not only in memory: tests read the state file next.
    return await wait_for(
        lambda: agent.loop.store.path.exists() and agent.loop.store.load().agent_id,
        timeout=10,
        message="enrollment",
    )


def _reports(enforcer: FakeEnforcer, agent_id: str, **match: Any) -> list[dict[str, Any]]:
    return [
        r for r in enforcer.reports_for(agent_id) if all(r.get(k) == v for k, v in match.items())
    ]


async def test_agent_enrolls_pins_key_applies_and_acks_with_rules_hash(
    enforcer: FakeEnforcer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    agent = RunningAgent(enforcer, tmp_path, http).start()
    try:
        agent_id = await _enrolled(agent)
        assert StateStore(tmp_path).load().signing_key == enforcer.signer.public_b64
        policy = make_policy(endpoint_id=agent_id, sequence=1)
        enforcer.publish(agent_id, enforcer.signer.sign(policy))
        report = (
            await wait_for(lambda: _reports(enforcer, agent_id, status="applied"), timeout=10)
        )[0]
        assert report["sequence"] == 1 and report["policy_id"] == policy.policy_id
        assert report["rules_sha256"] == rules_sha256(render_ruleset(policy, FACTS))
        await wait_for(lambda: (agent_id, 1) in enforcer.polls, message="poll after=1")
    finally:
        await agent.halt()


async def test_tampered_foreign_and_older_policies_are_refused_and_each_reported_once(
    enforcer: FakeEnforcer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    agent = RunningAgent(enforcer, tmp_path, http).start()
    signer = enforcer.signer
    try:
        agent_id = await _enrolled(agent)
        good = signer.sign(make_policy(endpoint_id=agent_id, sequence=2, mode="strict"))
        tampered = good.model_copy(
            update={"policy": make_policy(endpoint_id=agent_id, sequence=2, mode="none")}
        )
        enforcer.publish(agent_id, tampered)
        await wait_for(lambda: _reports(enforcer, agent_id, sequence=2, status="failed"))
        # The fake keeps re-delivering it; the agent backs off and does not report it again.
        polls = len(enforcer.polls)
        await wait_for(lambda: len(enforcer.polls) >= polls + 3, message="re-polls")

        enforcer.publish(agent_id, signer.sign(make_policy(endpoint_id="ep-other", sequence=3)))
        await wait_for(lambda: _reports(enforcer, agent_id, sequence=3))

        enforcer.publish(agent_id, signer.sign(make_policy(endpoint_id=agent_id, sequence=4)))
        await wait_for(lambda: _reports(enforcer, agent_id, sequence=4, status="applied"))

        enforcer.ignore_after = True
        enforcer.publish(agent_id, good)  # validly signed, but sequence 2 < applied 4
        await wait_for(
            lambda: [
                r for r in _reports(enforcer, agent_id, sequence=2) if "last applied" in r["detail"]
            ]
        )
        details = {
            r["sequence"]: r["detail"] for r in _reports(enforcer, agent_id, status="failed")
        }
        assert "signature does not verify" in _reports(enforcer, agent_id, sequence=2)[0]["detail"]
        assert "ep-other" in details[3]
        assert len(_reports(enforcer, agent_id, sequence=2)) == 2  # tampered once, stale once
        assert len(_reports(enforcer, agent_id, sequence=3)) == 1
        assert agent.loop.state.last_applied_sequence == 4
        assert agent.stats.by_refusal == {
            "signature": agent.stats.by_refusal["signature"],
            "endpoint": agent.stats.by_refusal["endpoint"],
            "sequence": agent.stats.by_refusal["sequence"],
        }
    finally:
        await agent.halt()


async def test_restarted_agent_keeps_its_enrollment_and_polls_after_last_applied(
    enforcer: FakeEnforcer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    agent = RunningAgent(enforcer, tmp_path, http).start()
    agent_id = await _enrolled(agent)
    enforcer.publish(agent_id, enforcer.signer.sign(make_policy(endpoint_id=agent_id, sequence=5)))
    await wait_for(lambda: _reports(enforcer, agent_id, sequence=5, status="applied"))
    await agent.halt()
    enforcer.polls.clear()

    restarted = RunningAgent(enforcer, tmp_path, http).start()
    try:
        await wait_for(lambda: enforcer.polls, message="first poll after restart")
        assert enforcer.polls[0] == (agent_id, 5)
        assert len(enforcer.enrollments) == 1
        assert restarted.stats.applied == 0  # re-applied at start, nothing new to ack
    finally:
        await restarted.halt()


async def test_unreadable_policy_is_counted_not_reported_and_enforcer_errors_are_retried(
    enforcer: FakeEnforcer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    agent = RunningAgent(enforcer, tmp_path, http).start()
    try:
        agent_id = await _enrolled(agent)
        enforcer.publish(agent_id, b'{"policy": {"sequence": "lots"}}')
        await wait_for(lambda: agent.stats.refused_unreportable >= 1)
        assert enforcer.reports_for(agent_id) == []
        enforcer.fail_next_polls = 3
        enforcer.publish(agent_id, enforcer.signer.sign(make_policy(endpoint_id=agent_id)))
        await wait_for(lambda: _reports(enforcer, agent_id, sequence=1, status="applied"))
        assert agent.stats.poll_errors >= 3
    finally:
        await agent.halt()


async def test_forgotten_agent_enrolls_again_as_the_same_endpoint_and_never_repins(
    enforcer: FakeEnforcer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Finding 1: a lost enrollment used to re-pin a fresh key and reset the fence to 0."""
    agent = RunningAgent(enforcer, tmp_path, http).start()
    original = enforcer.signer
    try:
        first = await _enrolled(agent)
        enforcer.publish(first, original.sign(make_policy(endpoint_id=first, sequence=4)))
        await wait_for(lambda: _reports(enforcer, first, sequence=4, status="applied"))
        # As after a wiped Redis: agent unknown, and a freshly generated signing key.
        enforcer.signer = TestSigner()
        enforcer.forget(first)
        await wait_for(lambda: len(enforcer.enrollments) == 2, message="re-enrollment")
        assert enforcer.enrollments[1]["endpoint_id"] == first
        await wait_for(lambda: agent.stats.reenrollments == 1, message="token renewed")
        assert agent.loop.state.agent_id == first
        enforcer.publish(first, enforcer.signer.sign(make_policy(endpoint_id=first, sequence=5)))
        await wait_for(lambda: _reports(enforcer, first, sequence=5, status="failed"))
        assert "key_id" in _reports(enforcer, first, sequence=5)[0]["detail"]
        # The key pinned at the first enrollment still works; the fence did not go back to 0.
        enforcer.ignore_after = True
        enforcer.publish(first, original.sign(make_policy(endpoint_id=first, sequence=3)))
        await wait_for(lambda: _reports(enforcer, first, sequence=3, status="failed"))
        enforcer.publish(first, original.sign(make_policy(endpoint_id=first, sequence=6)))
        await wait_for(lambda: _reports(enforcer, first, sequence=6, status="applied"))
        stored = StateStore(tmp_path).load()
        assert stored.signing_key == original.public_b64 and stored.fence == 6
    finally:
        await agent.halt()


async def test_many_simulated_agents_in_one_process_each_enroll_and_ack(
    enforcer: FakeEnforcer, tmp_path: Path
) -> None:
    count = 25
    config = AgentConfig(
        enforcer_url=enforcer.url,
        account_id="acct-1",
        enrollment_key=FakeEnforcer.ENROLLMENT_KEY,
        state_dir=tmp_path,
        hostname="sim",
        facts=FACTS,
        simulated=True,
        count=count,
        poll_wait=5.0,
        dev=True,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_agents(config, stop))
    try:
        await wait_for(lambda: len(enforcer.tokens) == count, message=f"{count} enrollments")
        assert {e["hostname"] for e in enforcer.enrollments} == {f"sim-{i}" for i in range(count)}
        for agent_id in list(enforcer.tokens):
            enforcer.publish(agent_id, enforcer.signer.sign(make_policy(endpoint_id=agent_id)))
        await wait_for(
            lambda: len({a for a, r in enforcer.reports if r["status"] == "applied"}) == count,
            message="every agent acked",
        )
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 10)
    assert stats.applied == count and stats.refused == 0


async def test_cli_runs_simulated_agents_as_a_process(
    enforcer: FakeEnforcer, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent",
        "--enforcer-url", enforcer.url,
        "--account-id", "acct-1",
        "--enrollment-key", FakeEnforcer.ENROLLMENT_KEY,
        "--state-dir", str(tmp_path),
        "--dns-resolvers", "192.0.2.53",
        "--simulated", "--count", "2", "--poll-wait", "2", "--dev",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for(lambda: len(enforcer.tokens) == 2, timeout=20, message="CLI enrollments")
        for agent_id in list(enforcer.tokens):
            enforcer.publish(agent_id, enforcer.signer.sign(make_policy(endpoint_id=agent_id)))
        await wait_for(lambda: len(enforcer.reports) == 2, message="CLI agents acked")
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--platform-addresses", "platform.example"], "is not an IP address"),
        (["--table-name", "bad name"], "table name"),
        (["--signing-public-key", "xx"], "signing public key"),
        (["--count", "3"], "--simulated"),
    ],
)
async def test_cli_refuses_bad_configuration_with_a_clear_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--dev", "--account-id", "acct-1", "--enrollment-key", "k",
        "--state-dir", str(tmp_path), "--dns-resolvers", "", *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert message in err.decode()


async def test_report_lost_to_a_crash_after_applying_is_sent_at_restart(
    enforcer: FakeEnforcer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    agent = RunningAgent(enforcer, tmp_path, http).start()
    agent_id = await _enrolled(agent)
    await agent.halt()
    # As if the agent died after persisting sequence 3 but before its report got through.
    policy = make_policy(endpoint_id=agent_id, sequence=3)
    store = StateStore(tmp_path)
    state = store.load()
    state.last_applied_sequence = state.poll_cursor = state.verified_sequence = 3
    state.last_policy = enforcer.signer.sign(policy)
    state.pending_report = {
        "sequence": 3,
        "policy_id": policy.policy_id,
        "status": "applied",
        "rules_sha256": rules_sha256(render_ruleset(policy, FACTS)),
        "detail": "simulated",
    }
    store.save(state)

    restarted = RunningAgent(enforcer, tmp_path, http).start()
    try:
        await wait_for(lambda: _reports(enforcer, agent_id, sequence=3, status="applied"))
        await wait_for(lambda: StateStore(tmp_path).load().pending_report is None)
    finally:
        await restarted.halt()
