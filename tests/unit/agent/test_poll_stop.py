"""The poll loop runs each poll in its own task (no task per poll): ``stop`` during a poll ends
the loop at once, and a cancellation that is not the loop's own still goes up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.client import EnforcerClient, EnforcerUnavailableError, Enrollment, StatusReport
from agent.firewall import SimulatedFirewall
from agent.loop import AgentIdentity, AgentLoop
from agent.state import StateStore
from agent.verification import PinnedKey
from shared.messages import SignedPolicy
from tests.unit.agent.policies import TestSigner, make_policy


class HangingClient(EnforcerClient):
    """Answers the scripted polls, then holds the next one until cancelled."""

    def __init__(self, answers: list[SignedPolicy | Exception | None]) -> None:
        super().__init__("http://enforcer.test", httpx.AsyncClient(), allow_plain_http=True)
        self.answers = answers
        self.polls = 0
        self.hanging = asyncio.Event()
        self.failed = asyncio.Event()
        self.cancelled = 0
        self.reports: list[StatusReport] = []

    async def poll_policy(
        self, enrollment: Enrollment, *, after: int, wait: float
    ) -> SignedPolicy | None:
        self.polls += 1
        await asyncio.sleep(0)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                self.failed.set()
                raise answer
            return answer
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def report(self, enrollment: Enrollment, report: StatusReport) -> None:
        self.reports.append(report)


def _loop(tmp_path: Path, client: HangingClient, signer: TestSigner) -> AgentLoop:
    store = StateStore(tmp_path, durable=False)
    state = store.load()
    state.agent_id, state.agent_token = "ep-1", "tok"
    store.save(state)

    async def key() -> str:
        return "k"

    return AgentLoop(
        identity=AgentIdentity("acct-1", "web-01", "linux"),
        client=client,
        store=store,
        firewall=SimulatedFirewall(HostFacts(platform_addresses=()), "hostiso"),
        enrollment_key=key,
        stats=AgentStats(),
        configured_key=PinnedKey.from_base64(signer.public_b64),
        poll_wait=1,
        table_check_interval=None,
        usage_interval=None,
        backoff_cap=0.01,
    )


async def test_stop_during_a_poll_ends_the_loop_and_cancels_only_the_poll(
    tmp_path: Path,
) -> None:
    signer = TestSigner()
    policy = signer.sign(make_policy(endpoint_id="ep-1", sequence=1, mode="none"))
    client = HangingClient([None, EnforcerUnavailableError("503", retry_after=None), policy])
    loop = _loop(tmp_path, client, signer)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    async with asyncio.timeout(10):
        await client.hanging.wait()
    assert loop.stats.applied == 1 and [r.sequence for r in client.reports] == [1]
    stop.set()
    async with asyncio.timeout(5):
        await task  # returns normally: the loop's own cancellation is taken back
    assert client.cancelled == 1 and not task.cancelled()
    assert task.cancelling() == 0


async def test_a_cancellation_that_is_not_the_loops_goes_up(tmp_path: Path) -> None:
    signer = TestSigner()
    client = HangingClient([])
    loop = _loop(tmp_path, client, signer)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    async with asyncio.timeout(10):
        await client.hanging.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and client.cancelled == 1


async def test_stop_and_an_outside_cancellation_together_still_cancel(tmp_path: Path) -> None:
    signer = TestSigner()
    client = HangingClient([])
    loop = _loop(tmp_path, client, signer)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    async with asyncio.timeout(10):
        await client.hanging.wait()
    stop.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_stop_while_backing_off_is_not_a_cancellation(tmp_path: Path) -> None:
    """Stop outside a poll (here, in the backoff after a 503) ends the loop by its own checks."""
    signer = TestSigner()
    client = HangingClient([EnforcerUnavailableError("503", retry_after=30.0)])
    loop = _loop(tmp_path, client, signer)
    loop.backoff_cap = 30.0
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    async with asyncio.timeout(10):
        await client.failed.wait()
    for _ in range(100):  # a few loop turns at most: the loop counts it, then backs off
        if loop.stats.poll_errors:
            break
        await asyncio.sleep(0)
    assert loop.stats.poll_errors == 1
    stop.set()
    async with asyncio.timeout(5):
        await task
    assert not task.cancelled() and client.polls == 1 and client.cancelled == 0
