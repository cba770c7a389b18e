"""Guarantee 9 for the isolation service: SIGKILL mid-stream of 1,000 requests, restart, no loss.

What is counted: the distinct (endpoint, sequence) policies on both enforcer command topics.
Every endpoint must end with exactly the policies its requests call for, each sequence carrying
exactly one policy (one policy_id). A command re-sent after the crash for the SAME sequence and
policy is allowed and counted separately: the enforcer and the agent apply only a higher sequence,
so such a copy is harmless; a second policy for one sequence or an extra sequence is not.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx

from shared.auth import mint_token
from shared.config import DEV_JWT_SECRET
from shared.infra.proc import free_port
from shared.kafka import make_producer, publish
from shared.messages import (
    Actor,
    AllowlistChanged,
    AllowlistEntry,
    EndpointRegistered,
    EnforcePolicy,
    IsolateEndpoint,
    Message,
    ReleaseEndpoint,
)
from shared.topics import Topics
from tests.helpers import ServiceProcess, kafka_admin_options, read_topic, wait_for

NORMAL = 200  # x 4 requests: isolate, isolate again (no-op), release, isolate -> sequences 1..3
PRIORITY = 100  # x 2 requests: strict, strict again (no-op) -> sequence 1
ACCOUNT = "acct-restart"
RMM = "203.0.113.10"
PARTNER = Actor(sub="alice", role="partner", account_id=ACCOUNT)


def requests(topics: Topics) -> list[tuple[str, str, Message]]:
    out: list[tuple[str, str, Message]] = []
    for step in range(4):
        for i in range(NORMAL):
            ep = f"n{i}"
            msg: Message
            if step == 2:
                msg = ReleaseEndpoint(endpoint_id=ep, requested_by=PARTNER)
            else:
                msg = IsolateEndpoint(endpoint_id=ep, mode="standard", requested_by=PARTNER)
            out.append((topics.isolation_requests, ep, msg))
        if step < 2:
            for i in range(PRIORITY):
                ep = f"p{i}"
                msg = IsolateEndpoint(endpoint_id=ep, mode="strict", requested_by=PARTNER)
                out.append((topics.isolation_requests_priority, ep, msg))
    return out


async def all_commands(bootstrap: str, topics: Topics) -> list[EnforcePolicy]:
    normal = await read_topic(bootstrap, topics, topics.enforcer_commands)
    priority = await read_topic(bootstrap, topics, topics.enforcer_commands_priority)
    return normal + priority


async def test_sigkill_mid_stream_loses_no_request_and_issues_no_wrong_policy(
    kafka_bootstrap: str, topics: Topics, service_env: dict[str, str], tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        await publish(
            producer,
            topics.settings_allowlist,
            ACCOUNT,
            AllowlistChanged(
                account_id=ACCOUNT,
                enabled=True,
                version=1,
                updated_at=now,
                changed_by=PARTNER,
                entries=(
                    AllowlistEntry(
                        id="e1", name="RMM", address=RMM, created_at=now, created_by="a"
                    ),
                ),
            ),
        )
        endpoints = [f"n{i}" for i in range(NORMAL)] + [f"p{i}" for i in range(PRIORITY)]
        await asyncio.gather(
            *(
                publish(
                    producer,
                    topics.endpoints,
                    ep,
                    EndpointRegistered(
                        endpoint_id=ep,
                        account_id=ACCOUNT,
                        hostname=ep,
                        platform="linux",
                        enrolled_at=now,
                    ),
                )
                for ep in endpoints
            )
        )
        env = dict(service_env, HOSTISO_LOG_LEVEL="WARNING")
        first = ServiceProcess("services.isolation", env, free_port(), tmp_path / "isolation-1.log")
        first.start()
        await first.wait_ready()

        stream = requests(topics)
        assert len(stream) == 1000

        killed = asyncio.Event()

        async def publish_stream() -> None:
            for start in range(0, len(stream), 50):
                if start == len(stream) * 3 // 4:
                    # The service keeps pace with this producer: hold the last quarter until the
                    # kill, so the kill always lands mid-stream, however fast the service is.
                    await killed.wait()
                # The idempotent producer keeps each partition's order with several in flight.
                futures = [
                    await producer.send(topic, msg.to_bytes(), key=key.encode())
                    for topic, key, msg in stream[start : start + 50]
                ]
                await asyncio.gather(*futures)

        publishing = asyncio.create_task(publish_stream())
        await wait_for(
            lambda: _at_least(kafka_bootstrap, topics, 150),
            timeout=120,
            interval=0.2,
            message="150 commands before the kill",
        )
        first.kill()
        killed.set()
        before_kill = len(await all_commands(kafka_bootstrap, topics))
        await publishing

        second = ServiceProcess(
            "services.isolation", env, free_port(), tmp_path / "isolation-2.log"
        )
        second.start()
        try:
            await second.wait_ready()
            expected_policies = NORMAL * 3 + PRIORITY

            async def complete() -> list[EnforcePolicy] | None:
                found = await all_commands(kafka_bootstrap, topics)
                distinct = {(c.policy.endpoint_id, c.policy.sequence) for c in found}
                return found if len(distinct) >= expected_policies else None

            commands = await wait_for(complete, timeout=180, interval=0.5, message="every policy")
            token = mint_token(DEV_JWT_SECRET, sub="soc", role="soc")
            async with httpx.AsyncClient(base_url=second.url) as http:
                state = (
                    await http.get(
                        "/v1/endpoints/n7/isolation", headers={"Authorization": f"Bearer {token}"}
                    )
                ).json()
        finally:
            second.stop()
    finally:
        await producer.stop()

    assert before_kill < expected_policies, "the kill came after the stream was done"
    by_sequence: dict[tuple[str, int], set[str]] = defaultdict(set)
    policies: dict[tuple[str, int], EnforcePolicy] = {}
    for command in commands:
        key = (command.policy.endpoint_id, command.policy.sequence)
        by_sequence[key].add(command.policy.policy_id)
        policies[key] = command
    resent = len(commands) - len(by_sequence)
    print(
        f"\n[restart] {before_kill} commands before the kill, {len(commands)} in all, {resent} re-sent copies"
    )
    assert all(len(ids) == 1 for ids in by_sequence.values()), "two policies for one sequence"
    for i in range(NORMAL):
        seqs = sorted(s for (ep, s) in policies if ep == f"n{i}")
        assert seqs == [1, 2, 3], (f"n{i}", seqs)
        modes = [policies[(f"n{i}", s)].policy.mode for s in seqs]
        assert modes == ["standard", "none", "standard"]
        for s in (1, 3):
            assert [p.address for p in policies[(f"n{i}", s)].policy.allowed_outbound] == [RMM]
    for i in range(PRIORITY):
        seqs = sorted(s for (ep, s) in policies if ep == f"p{i}")
        assert seqs == [1], (f"p{i}", seqs)
        assert policies[(f"p{i}", 1)].policy.mode == "strict"
    assert (state["state"], state["desired_sequence"]) == ("isolation_pending", 3)


async def _at_least(bootstrap: str, topics: Topics, count: int) -> bool:
    return len(await all_commands(bootstrap, topics)) >= count
