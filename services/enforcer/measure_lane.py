"""``python -m services.enforcer.measure_lane``: enforcer CPU per stored policy on the priority lane.

The account-wide strict case: ``--policies`` (10,000) strict commands for as many endpoints put
on the priority command lane at once, then the enforcer (a real process, as in
``services.enforcer.measure``) stores, signs and announces them; the figure is its CPU from the
first command produced to the last one committed, divided by the policies. A warm-up batch goes
first (connections, scripts, caches); ``..._net`` takes off the CPU the idle process used for
as long (sampled for 3 s before). Kafka and Redis as in ``measure``
(HOSTISO_KAFKA_BOOTSTRAP / HOSTISO_REDIS_URL, or local ones).
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from services.enforcer.measure import (
    Stack,
    committed_total,
    cpu_seconds,
    enforcer_process,
    produce_backlog,
    wait_ready,
)
from shared.kafka import ensure_topics
from shared.topics import GroupName, Topics


async def _consumed(stack: Stack, group: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await committed_total(stack.bootstrap, group) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{group} did not commit {count} records in {timeout} s")
        await asyncio.sleep(0.1)


async def measure_priority_lane(
    stack: Stack,
    policies: int,
    log_dir: Path,
    *,
    warmup: int = 200,
    timeout: float = 600,
    idle_s: float = 3.0,
    spy: Path | None = None,
) -> dict[str, Any]:
    prefix = f"l{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{prefix}.")
    await ensure_topics(stack.bootstrap, topics)
    group = topics.group(GroupName.ENFORCER_COMMANDS_PRIORITY)
    topic = topics.enforcer_commands_priority
    with enforcer_process(stack, prefix, log_dir) as (url, pid):
        await wait_ready(url)
        await produce_backlog(stack.bootstrap, topic, warmup, endpoints=warmup, prefix="warm")
        await _consumed(stack, group, warmup, timeout)
        spying = (
            None
            if spy is None
            else await asyncio.create_subprocess_exec(
                "py-spy", "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(spy)
            )
        )
        # What the idle process burns per second (fetch loops, gauges), taken off the figure:
        # a slower run on a loaded machine would otherwise count more idle time per policy.
        idle_from, idle_started = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(idle_s)
        idle_rate = (cpu_seconds(pid) - idle_from) / (time.monotonic() - idle_started)
        before = cpu_seconds(pid)
        started = time.monotonic()
        await produce_backlog(stack.bootstrap, topic, policies, endpoints=policies, prefix="ep")
        await _consumed(stack, group, warmup + policies, timeout)
        elapsed = time.monotonic() - started
        used = cpu_seconds(pid) - before
        if spying is not None:
            spying.send_signal(signal.SIGINT)
            await spying.wait()
    return {
        "policies": policies,
        "seconds": round(elapsed, 2),
        "policies_per_s": round(policies / elapsed, 1),
        "enforcer_cpu_ms_per_policy": round(1000 * used / policies, 4),
        "idle_cpu_ms_per_s": round(1000 * idle_rate, 2),
        "enforcer_cpu_ms_per_policy_net": round(
            1000 * max(0.0, used - idle_rate * elapsed) / policies, 4
        ),
    }


def main(
    policies: Annotated[
        int, typer.Option(help="commands put on the priority lane at once")
    ] = 10_000,
    spy: Annotated[
        Path | None, typer.Option(help="sampled by py-spy, collapsed stacks here")
    ] = None,
) -> None:
    """Print the figure as one JSON line."""
    log_dir = Path(tempfile.mkdtemp(prefix="hostiso-measure-lane-"))

    async def run() -> None:
        with Stack() as stack:
            figure = await measure_priority_lane(stack, policies, log_dir, spy=spy)
            print(orjson.dumps({"priority_lane": figure}).decode(), flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    typer.run(main)
