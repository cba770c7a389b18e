"""The six figures of issue 6, measured on one running stack (``python -m bench``)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.baseline import bare_relay_rate
from bench.stack import Stack, StatusWatcher, percentile, rss_kib
from shared.messages import (
    Actor,
    EnforcePolicy,
    FrozenPolicy,
    IsolateEndpoint,
    PolicyMode,
    ReleaseEndpoint,
    StrictIsolateAccount,
    utcnow,
)

log = logging.getLogger(__name__)

SOC = Actor(sub="bench-soc", role="soc")
# Longest wait for one agent's applied report at the reduced sizes (``BenchSizes.apply_wait_s``).
WAIT_S = 180.0


@dataclass(frozen=True)
class BenchSizes:
    """How big each measurement is; the defaults are the reduced (CI-sized) run."""

    pipeline_agents: int = 200
    throughput_requests: int = 5000
    throughput_max_s: float = 40.0
    relay_messages: int = 5000
    latency_seconds: float = 8.0
    latency_load_fraction: float = 0.3
    backlog: int = 20_000
    strict_samples: int = 15
    account_endpoints: int = 150
    fanout_small: int = 10
    fanout_samples: int = 20
    allowlist_entries: int = 5
    # Isolated endpoints a revoked entry is cut from (of the account-wide strict group).
    revoke_endpoints: int = 100
    # Simulated agents per agent process (the agents of one account are split over processes).
    agents_per_process: int = 100
    # Long-poll wait the simulated agents ask for: idle re-polls cost the enforcer CPU per agent.
    poll_wait_s: float = 20.0
    # Longest wait for one request's applied report (a fleet-wide wait is 5 times it): past it
    # the run stops, as a request that never applies is a failure, not a slow figure.
    apply_wait_s: float = WAIT_S

    @classmethod
    def full(cls) -> BenchSizes:
        return cls(
            pipeline_agents=500,
            throughput_requests=10_000,
            throughput_max_s=300.0,
            relay_messages=20_000,
            latency_seconds=20.0,
            backlog=100_000,
            strict_samples=30,
            account_endpoints=10_000,
            fanout_samples=40,
            revoke_endpoints=1000,
            # One light-client process holds thousands of idle agents (≈ 8 KiB each).
            agents_per_process=2000,
            # 10,000 agents re-polling every 20 s are 500 idle polls/s; 55 s (the enforcer's
            # limit is 60) makes that 190/s.
            poll_wait_s=55.0,
            # 10,500 polling agents on 2 shared cores: one apply took over 180 s in figure 1 of
            # a run that had enrolled them all; a slow figure is still a figure.
            apply_wait_s=600.0,
        )

    @classmethod
    def tiny(cls) -> BenchSizes:
        return cls(
            pipeline_agents=30,
            throughput_requests=150,
            relay_messages=1000,
            latency_seconds=3.0,
            backlog=3000,
            strict_samples=5,
            account_endpoints=40,
            fanout_small=5,
            fanout_samples=8,
            allowlist_entries=2,
            revoke_endpoints=20,
            agents_per_process=20,
        )


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * percentile(list(values), 0.50), 1),
        "p95_ms": round(1000 * percentile(list(values), 0.95), 1),
        "p99_ms": round(1000 * percentile(list(values), 0.99), 1),
        "max_ms": round(1000 * max(values), 1) if values else float("nan"),
        "samples": len(values),
    }


class Driver:
    """Sends requests and waits for the agents' applied reports."""

    def __init__(self, stack: Stack, watcher: StatusWatcher, wait_s: float = WAIT_S) -> None:
        self.stack = stack
        self.watcher = watcher
        self.wait_s = wait_s
        self.isolated: dict[str, bool] = {}

    async def toggle(self, endpoint: str) -> float:
        """Isolate (standard) or release ``endpoint``; seconds from send to agent-applied."""
        topics = self.stack.topics
        future = self.watcher.expect(endpoint)
        message: IsolateEndpoint | ReleaseEndpoint
        if self.isolated.get(endpoint):
            message = ReleaseEndpoint(endpoint_id=endpoint, requested_by=SOC, reason="bench")
        else:
            message = IsolateEndpoint(
                endpoint_id=endpoint, mode="standard", requested_by=SOC, reason="bench"
            )
        sent = time.time()
        await self.stack.send(topics.isolation_requests, endpoint, message)
        _, applied_at = await asyncio.wait_for(future, self.wait_s)
        self.isolated[endpoint] = not self.isolated.get(endpoint)
        return max(0.0, applied_at - sent)

    async def strict(self, endpoint: str) -> float:
        future = self.watcher.expect(endpoint)
        sent = time.time()
        await self.stack.send(
            self.stack.topics.isolation_requests_priority,
            endpoint,
            IsolateEndpoint(endpoint_id=endpoint, mode="strict", requested_by=SOC, reason="bench"),
        )
        _, applied_at = await asyncio.wait_for(future, self.wait_s)
        self.isolated[endpoint] = True
        return max(0.0, applied_at - sent)


async def throughput(
    driver: Driver, endpoints: list[str], total: int, max_s: float = 1e9
) -> dict[str, Any]:
    """Closed loop: every endpoint always has one request in flight, until ``total`` are applied
    (or no new request after ``max_s`` seconds)."""
    remaining = total
    stop_at = time.perf_counter() + max_s

    async def worker(endpoint: str) -> int:
        nonlocal remaining
        done = 0
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            await driver.toggle(endpoint)
            done += 1
        return done

    started = time.perf_counter()
    done = sum(await asyncio.gather(*(worker(e) for e in endpoints)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "seconds": round(elapsed, 2), "requests_per_s": done / elapsed}


async def latency(
    driver: Driver, endpoints: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    """Open loop at ``rate`` requests/s (an idle endpoint each time): send → agent-applied."""
    idle = list(endpoints)
    random.shuffle(idle)
    latencies: list[float] = []
    skipped = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(endpoint: str) -> None:
        latencies.append(await driver.toggle(endpoint))
        idle.append(endpoint)

    interval = 1.0 / rate
    started = time.perf_counter()
    n = 0
    while time.perf_counter() - started < seconds:
        target = started + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        n += 1
        if not idle:
            skipped += 1
            continue
        task = asyncio.create_task(one(idle.pop(0)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return {"offered_per_s": round(rate, 1), "skipped_no_idle_endpoint": skipped, **_ms(latencies)}


def _command(endpoint: str, account: str, sequence: int, mode: PolicyMode) -> bytes:
    policy = FrozenPolicy(
        policy_id=f"bench-{endpoint}-{sequence}",
        endpoint_id=endpoint,
        account_id=account,
        sequence=sequence,
        mode=mode,
        platform=("127.0.0.1",),
        settings_version=0,
        issued_at=utcnow(),
        issued_by="bench",
        reason="bench",
    )
    return EnforcePolicy(request_id=policy.policy_id, policy=policy).to_bytes()


async def produce_backlog(stack: Stack, count: int, tag: str) -> float:
    """``count`` normal commands for 10,000 never-enrolled endpoints, as fast as the broker takes them."""
    template = _command("ENDPOINT", "acct-backlog", 987654321, "standard")
    producer = AIOKafkaProducer(
        **stack.kafka_options,
        bootstrap_servers=stack.bootstrap,
        acks=1,
        linger_ms=20,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        for i in range(count):
            endpoint = f"{tag}-{i % 10_000}"
            value = template.replace(b"ENDPOINT", endpoint.encode()).replace(
                b"987654321", str(i // 10_000 + 1).encode()
            )
            await producer.send(stack.topics.enforcer_commands, value, key=endpoint.encode())
            if i % 20_000 == 19_999:
                await producer.flush()
        await producer.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def group_lag(stack: Stack, group: str, topic: str) -> int:
    """Records on ``topic`` that ``group`` has not committed yet."""
    admin = AIOKafkaAdminClient(**stack.kafka_options, bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    ends = await _end_offsets(stack, topic)
    return sum(
        max(0, end - (committed[tp].offset if tp in committed else 0)) for tp, end in ends.items()
    )


async def _end_offsets(stack: Stack, topic: str) -> dict[TopicPartition, int]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**stack.kafka_options, bootstrap_servers=stack.bootstrap)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def priority(
    driver: Driver, endpoints: list[str], account: str, backlog: int, samples: int
) -> dict[str, Any]:
    """Strict override latency: idle lanes, behind a normal backlog, and a single FIFO lane."""
    stack = driver.stack
    idle_eps = endpoints[:samples]
    lane_eps = endpoints[samples : 2 * samples]
    fifo_eps = endpoints[2 * samples : 3 * samples]
    normal_group = f"{stack.topics.prefix}enforcer-normal"
    idle = [await driver.strict(e) for e in idle_eps]

    produce_s = await produce_backlog(stack, backlog, "bk1")
    lag_at_start = await group_lag(stack, normal_group, stack.topics.enforcer_commands)
    under_backlog = [await driver.strict(e) for e in lane_eps]
    lag_after = await group_lag(stack, normal_group, stack.topics.enforcer_commands)
    drained = time.perf_counter()
    while await group_lag(stack, normal_group, stack.topics.enforcer_commands) > 0:
        await asyncio.sleep(0.5)
        if time.perf_counter() - drained > 600:
            break

    # The baseline our lanes beat: the strict command queued behind the same backlog on one lane.
    await produce_backlog(stack, backlog, "bk2")
    futures = []
    sent = time.time()
    for endpoint in fifo_eps:
        floor = driver.watcher.applied_seq.get(endpoint, 0)
        futures.append(driver.watcher.expect(endpoint, floor))
        await stack.send(
            stack.topics.enforcer_commands,
            endpoint,
            _command(endpoint, account, floor + 1000, "strict"),
        )
    fifo = [max(0.0, at - sent) for _, at in await asyncio.gather(*futures)]
    idle_ms = _ms(idle)
    lanes_ms = _ms(under_backlog)
    return {
        "backlog": backlog,
        "backlog_produce_s": round(produce_s, 2),
        "normal_lag_when_strict_sent": lag_at_start,
        "normal_lag_after_last_strict": lag_after,
        "idle": idle_ms,
        "priority_lane_under_backlog": lanes_ms,
        "single_fifo_lane_under_backlog": _ms(fifo),
        "ratio_p99_backlog_vs_idle": round(lanes_ms["p99_ms"] / max(idle_ms["p99_ms"], 1e-3), 2),
        "goal_ratio_max": 2.0,
    }


async def account_strict(
    driver: Driver, endpoints: list[str], account: str, pipeline_rate: float
) -> dict[str, Any]:
    """Isolate every endpoint of ``account``, then strict the account: time until all hold strict."""
    stack = driver.stack
    gate = asyncio.Semaphore(200)

    async def isolate(endpoint: str) -> None:
        async with gate:
            if not driver.isolated.get(endpoint):
                await driver.toggle(endpoint)

    started = time.perf_counter()
    await asyncio.gather(*(isolate(e) for e in endpoints))
    isolate_s = time.perf_counter() - started
    futures = [driver.watcher.expect(e) for e in endpoints]
    cpu_before = stack.cpu_by_process()
    sent = time.perf_counter()
    sent_wall = time.time()
    await stack.send(
        stack.topics.isolation_requests_priority,
        account,
        StrictIsolateAccount(account_id=account, requested_by=SOC, reason="bench: RMM compromised"),
    )
    applied = await asyncio.wait_for(asyncio.gather(*futures), driver.wait_s * 5)
    elapsed = time.perf_counter() - sent
    rate = len(endpoints) / elapsed
    # 2 shared cores: which process the fleet's strict spent them in (ms per endpoint).
    cpu = cpu_per_unit(cpu_before, stack.cpu_by_process(), len(endpoints))
    return {
        "endpoints": len(endpoints),
        "standard_isolation_of_all_s": round(isolate_s, 2),
        "strict_all_held_s": round(elapsed, 2),
        **fleet_applied_times([at for _, at in applied], sent_wall),
        "endpoints_per_s": round(rate, 1),
        "ratio_vs_pipeline_throughput": round(rate / pipeline_rate, 2) if pipeline_rate else None,
        "cpu_ms_per_endpoint_by_process": cpu["by_process_cpu_ms"],
    }


def fleet_applied_times(applied_at: Sequence[float], sent_at: float) -> dict[str, float]:
    """Seconds from the request until 50 %, 99 % and 100 % of the agents reported applied
    (``applied_at``: each agent's report time, epoch s)."""
    if not applied_at:
        return {"applied_50pct_s": 0.0, "applied_99pct_s": 0.0, "applied_100pct_s": 0.0}
    ordered = sorted(max(0.0, at - sent_at) for at in applied_at)

    def share(fraction: float) -> float:
        # The time by which at least ``fraction`` of the fleet has applied.
        index = max(0, -(-len(ordered) * int(fraction * 100) // 100) - 1)
        return round(ordered[index], 2)

    return {
        "applied_50pct_s": share(0.50),
        "applied_99pct_s": share(0.99),
        "applied_100pct_s": round(ordered[-1], 2),
    }


# What the control plane is made of, in ``Stack.cpu_by_process`` names (agents and the bench
# driver are not part of it).
CONTROL_PLANE = ("settings", "isolation", "enforcer", "kafka broker(s)", "redis", "redis cluster")


def cpu_per_unit(before: dict[str, float], after: dict[str, float], units: int) -> dict[str, Any]:
    """CPU ms per unit of work between two ``cpu_by_process`` readings: the control plane's
    (services + broker + Redis), the simulated agents' and each process's."""
    delta = {name: max(0.0, used - before.get(name, 0.0)) for name, used in after.items()}

    def ms(names: Sequence[str]) -> float:
        return round(1000 * sum(delta.get(n, 0.0) for n in names) / max(units, 1), 3)

    agents = [name for name in delta if name.startswith("agents:")]
    return {
        "control_plane_cpu_ms": ms(CONTROL_PLANE),
        "agents_cpu_ms": ms(agents),
        "by_process_cpu_ms": {name: ms([name]) for name in sorted(delta)},
    }


def per_agent_rss_kib(samples: Sequence[tuple[int, int]]) -> float | None:
    """KiB of RSS each idle agent adds: the least-squares slope of (agents in a process, RSS KiB)
    over the agent processes (the interpreter's own RSS is the intercept)."""
    points = [(n, rss) for n, rss in samples if n > 0 and rss > 0]
    if len({n for n, _ in points}) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_rss = sum(rss for _, rss in points) / len(points)
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    slope = sum((n - mean_n) * (rss - mean_rss) for n, rss in points) / spread
    return round(slope, 1)


async def revoke(driver: Driver, endpoints: list[str], account: str) -> dict[str, Any]:
    """Standard-isolate ``endpoints``, then revoke an entry: request → last affected agent applied.

    The revoke goes through the settings REST API (commit, outbox, Kafka), the isolation
    service's revocation fan-out and the priority lanes to every agent.
    """
    stack = driver.stack
    gate = asyncio.Semaphore(200)

    async def isolate(endpoint: str) -> None:
        async with gate:
            if not driver.isolated.get(endpoint):
                await driver.toggle(endpoint)

    await asyncio.gather(*(isolate(e) for e in endpoints))
    url = f"{stack.services['settings'].url}/v1/accounts/{account}/tooling-allowlist"
    async with httpx.AsyncClient(timeout=60) as http:
        listed = await http.get(url, headers=stack.auth())
        listed.raise_for_status()
        entry = listed.json()["entries"][0]
        futures = [driver.watcher.expect(e) for e in endpoints]
        sent = time.time()
        response = await http.post(
            f"{url}/entries/{entry['id']}/revoke",
            json={"reason": "bench: tool compromised"},
            headers=stack.auth(),
        )
        accepted_s = time.time() - sent
        response.raise_for_status()
    applied = await asyncio.wait_for(asyncio.gather(*futures), driver.wait_s * 5)
    last = max(at for _, at in applied)
    elapsed = max(0.0, last - sent)
    return {
        "endpoints": len(endpoints),
        "endpoints_counted_by_202": response.json().get("endpoints"),
        "accepted_202_s": round(accepted_s, 3),
        "revoke_to_last_agent_applied_s": round(elapsed, 2),
        "endpoints_per_s": round(len(endpoints) / elapsed, 1) if elapsed else None,
    }


async def _read_all(stack: Stack, topic: str) -> list[tuple[int, bytes]]:
    """(broker timestamp ms, value) of every record on ``topic`` up to its end now."""
    from aiokafka import AIOKafkaConsumer

    ends = await _end_offsets(stack, topic)
    consumer = AIOKafkaConsumer(
        **stack.kafka_options, bootstrap_servers=stack.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    out: list[tuple[int, bytes]] = []
    try:
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            out.extend((r.timestamp, r.value or b"") for rs in batch.values() for r in rs)
    finally:
        await consumer.stop()
    return out


async def hops(stack: Stack) -> dict[str, Any]:
    """Where a request's time goes: request produced → command produced → agent report."""
    import orjson

    requests = {
        orjson.loads(v)["request_id"]: ts
        for ts, v in await _read_all(stack, stack.topics.isolation_requests)
    }
    commands = {}
    for ts, v in await _read_all(stack, stack.topics.enforcer_commands):
        data = orjson.loads(v)
        policy = data["policy"]
        commands[(policy["endpoint_id"], policy["sequence"])] = (data["request_id"], ts)
    reports: dict[tuple[str, int], float] = {}
    for _, v in await _read_all(stack, stack.topics.isolation_status):
        data = orjson.loads(v)
        key = (data["endpoint_id"], data["sequence"])
        reports.setdefault(key, _ts(data["occurred_at"]))
    to_command: list[float] = []
    to_report: list[float] = []
    for key, (request_id, command_ts) in commands.items():
        if request_id in requests and key in reports:
            to_command.append((command_ts - requests[request_id]) / 1000)
            to_report.append(reports[key] - command_ts / 1000)
    return {
        "request_to_command (isolation service)": _ms(to_command),
        "command_to_agent_report (enforcer + agent)": _ms(to_report),
    }


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def waiting_agents(stack: Stack) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{stack.services['enforcer'].url}/metrics", timeout=10)).text
    for line in text.splitlines():
        if line.startswith("hostiso_enforcer_waiting_agents "):
            return float(line.split()[1])
    return float("nan")


async def wait_waiting(stack: Stack, count: int, timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    seen = 0.0
    while time.monotonic() < deadline:
        try:
            seen = await waiting_agents(stack)
        except httpx.HTTPError as exc:
            # A saturated enforcer (thousands of agents enrolling) may answer /metrics late:
            # that is a figure to wait out, not a reason to abort the bench.
            logging.getLogger(__name__).warning("enforcer /metrics: %r", exc)
            continue
        if seen >= count:
            return seen
        await asyncio.sleep(0.5)
    return seen


async def delivery(
    driver: Driver, endpoints: list[str], account: str, samples: int
) -> dict[str, Any]:
    """Command on the priority lane → agent-applied, one at a time, for ``samples`` agents."""
    stack = driver.stack
    latencies = []
    for endpoint in (endpoints * samples)[:samples]:
        floor = driver.watcher.applied_seq.get(endpoint, 0)
        future = driver.watcher.expect(endpoint, floor)
        sent = time.time()
        await stack.send(
            stack.topics.enforcer_commands_priority,
            endpoint,
            _command(endpoint, account, floor + 1, "strict"),
        )
        _, at = await asyncio.wait_for(future, driver.wait_s)
        latencies.append(max(0.0, at - sent))
    return _ms(latencies)


async def footprint(stack: Stack, isolated: int, accounts: int, entries: int) -> dict[str, Any]:
    """Redis ``MEMORY USAGE`` of the services' keys, grouped by kind."""
    from redis.asyncio import Redis

    redis = Redis.from_url(stack.redis.url)
    kinds: dict[str, list[int]] = {}
    try:
        keys = [k async for k in redis.scan_iter(match=f"{stack.redis_prefix}*", count=5000)]
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.memory_usage(key, samples=0)
            sizes = await pipe.execute()
        # Request outcomes are fields of one hash per endpoint (isolation:requests): count them.
        outcome_keys = [
            k
            for k in keys
            if key_kind_parts(k.decode()[len(stack.redis_prefix) :])[:2]
            == ["isolation", "requests"]
        ]
        async with redis.pipeline(transaction=False) as pipe:
            for key in outcome_keys:
                pipe.hlen(key)
            outcomes = sum(int(n or 0) for n in await pipe.execute())
    finally:
        await redis.aclose()
    for key, size in zip(keys, sizes, strict=True):
        parts = key_kind_parts(key.decode()[len(stack.redis_prefix) :])
        kind = ":".join(parts[:2])
        if parts[:2] == ["settings", "allowlist"] and len(parts) >= 4:
            kind = f"settings:allowlist:*:{parts[3]}"
        kinds.setdefault(kind, []).append(int(size or 0))
    by_kind = {k: {"keys": len(v), "bytes": sum(v)} for k, v in sorted(kinds.items())}

    def total(*names: str) -> int:
        return sum(by_kind.get(n, {"bytes": 0})["bytes"] for n in names)

    per_endpoint = total("isolation:state", "enforcer:policy") / max(isolated, 1)
    # Whole outcomes (isolation:request) live only until the command left; the per-endpoint
    # hash keeps a 12-byte mark per request for the outcome TTL (24 h by default).
    per_request = total("isolation:request", "isolation:requests") / max(outcomes, 1)
    per_agent = total("enforcer:agent", "enforcer:token", "isolation:endpoint") / max(
        by_kind.get("enforcer:agent", {"keys": 1})["keys"], 1
    )
    allowlist = [k for k in by_kind if k.startswith("settings:allowlist:")]
    per_account = total(*allowlist, "isolation:settings") / max(accounts, 1)
    return {
        "isolated_endpoints": isolated,
        "bytes_per_isolated_endpoint": round(per_endpoint),
        "bytes_per_request_outcome": round(per_request),
        "bytes_per_enrolled_agent": round(per_agent),
        "accounts_with_allowlist": accounts,
        "entries_per_allowlist": entries,
        "bytes_per_account_allowlist": round(per_account),
        "by_kind": by_kind,
        "bytes_per_isolated_endpoint_by_kind": {
            kind: round(v["bytes"] / max(isolated, 1)) for kind, v in by_kind.items()
        },
    }


def key_kind_parts(key: str) -> list[str]:
    """The parts of a Redis key (prefix removed) without its hash-tag segment: keys on Redis
    Cluster read ``isolation:{iso07}:state:ep-1``, whose kind is ``isolation:state``."""
    return [p for p in key.split(":") if not (p.startswith("{") and p.endswith("}"))]


async def add_allowlist(stack: Stack, account: str, entries: int, base: int) -> None:
    url = stack.services["settings"].url
    async with httpx.AsyncClient(timeout=30) as http:
        await settings_write(
            http,
            "PATCH",
            f"{url}/v1/accounts/{account}/tooling-allowlist",
            {"enabled": True},
            stack.auth(),
        )
        for i in range(entries):
            await settings_write(
                http,
                "POST",
                f"{url}/v1/accounts/{account}/tooling-allowlist/entries",
                {"name": f"RMM {i}", "address": f"203.0.{base}.{10 + i}"},
                stack.auth(),
            )


async def settings_write(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout: float = 120.0,
) -> httpx.Response:
    """One settings write, retried while the service answers 5xx without having saved it.

    A 503 whose body carries ``version`` says "saved, not yet in Kafka" (the outbox publishes it
    later): that write is done, and writing it again would add a second entry. On a loaded
    machine the first writes of a fresh stack often wait past the service's publish wait.
    """
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        response = await http.request(method, url, json=body, headers=headers)
        if response.status_code < 500:
            response.raise_for_status()
            return response
        if response.status_code == 503 and "version" in _problem(response):
            log.warning("%s %s: saved, not yet published; going on", method, url)
            return response
        if time.monotonic() + delay > deadline:
            response.raise_for_status()
        log.warning("%s %s: HTTP %d; retrying", method, url, response.status_code)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class PhaseClock:
    """Wall seconds of each phase of a bench run, logged as each one ends: the full-size run
    takes long, and CI time is planned from these."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """``phase`` ended now (it began where the previous one ended)."""
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 1)
        self._last = now
        log.info("bench phase done: %s in %.1f s", phase, self.seconds[phase])


def summarize_profile(path: Path, lines: int = 80) -> list[str]:
    """The heaviest lines of a pyinstrument text profile."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace").splitlines()
    return text[:lines]


async def run_bench(
    workdir: Path,
    sizes: BenchSizes,
    *,
    profile: bool = False,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start the stack, measure the six figures, stop everything; returns the report.

    ``report`` is filled as the figures come: if the run fails, what it measured so far (and
    the phases it finished) is still there for the caller to write.
    """
    stack = Stack(workdir)
    report = {} if report is None else report
    report.update(sizes=asdict(sizes), workdir=str(workdir))
    started = time.perf_counter()
    clock = PhaseClock()
    report["phases_s"] = clock.seconds
    try:
        await stack.start_infra()
        await stack.start_services(profile=("isolation", "enforcer") if profile else ())
        watcher = StatusWatcher(stack.bootstrap, stack.topics.isolation_status)
        await watcher.start()
        driver = Driver(stack, watcher, sizes.apply_wait_s)
        enforcer_pid = stack.services["enforcer"].pid
        accounts = ("acct-bench", "acct-strict")
        for i, account in enumerate(accounts):
            await add_allowlist(stack, account, sizes.allowlist_entries, i + 1)
        clock.mark("start Kafka, Redis, services; allowlists")

        # Figure 5, first half: delivery with only a few agents waiting.
        per_process = sizes.agents_per_process
        few = await stack.start_agents(
            "acct-fanout",
            sizes.fanout_small,
            per_process=per_process,
            poll_wait=sizes.poll_wait_s,
        )
        await wait_waiting(stack, sizes.fanout_small)
        small = await delivery(driver, few.endpoints, "acct-fanout", sizes.fanout_samples)
        rss_small = rss_kib(enforcer_pid)
        clock.mark("fig 5: delivery, few agents waiting")

        pipeline = await stack.start_agents(
            "acct-bench",
            sizes.pipeline_agents,
            per_process=per_process,
            poll_wait=sizes.poll_wait_s,
        )
        strict_group = await stack.start_agents(
            "acct-strict",
            sizes.account_endpoints,
            timeout=max(300.0, sizes.account_endpoints / 10),
            per_process=per_process,
            poll_wait=sizes.poll_wait_s,
        )
        clock.mark("enroll the pipeline and account agents")
        total_agents = sizes.fanout_small + sizes.pipeline_agents + sizes.account_endpoints
        waiting = await wait_waiting(stack, total_agents, timeout=max(300.0, total_agents / 20))
        report["enrollment"] = {
            group.account_id: {
                "agents": group.count,
                "processes": len(group.procs),
                "enroll_concurrency_per_process": group.enroll_concurrency_per_process,
                "all_enrolled_s": round(group.enroll_s, 1),
                "agents_per_s": round(group.count / max(group.enroll_s, 1e-3), 1),
                "orphan_endpoints": group.orphan_endpoints,
            }
            for group in stack.agents
        }
        # Every agent is idle in its long poll now: what each one adds to its process's RSS.
        agent_rss = [
            (share, rss_kib(pid))
            for group in stack.agents
            for share, pid in zip(group.shares, group.pids, strict=False)
        ]
        large = await delivery(driver, few.endpoints, "acct-fanout", sizes.fanout_samples)
        report["fanout"] = {
            "agents_small": sizes.fanout_small,
            "delivery_small": small,
            "agents_large": total_agents,
            "waiting_seen_large": waiting,
            "delivery_large": large,
            "ratio_p99_large_vs_small": round(large["p99_ms"] / max(small["p99_ms"], 1e-3), 2),
            "enforcer_rss_mib_small": round(rss_small / 1024, 1),
            "enforcer_rss_mib_large": round(rss_kib(enforcer_pid) / 1024, 1),
        }
        clock.mark("fig 5: every agent waiting; delivery, all agents waiting")

        cpu_relay = stack.cpu_by_process()
        relay = await bare_relay_rate(stack.bootstrap, sizes.relay_messages)
        relay_cpu = cpu_per_unit(cpu_relay, stack.cpu_by_process(), sizes.relay_messages)
        cpu_before = stack.cpu_by_process()
        pipe = await throughput(
            driver, pipeline.endpoints, sizes.throughput_requests, sizes.throughput_max_s
        )
        report["throughput"] = {
            **pipe,
            "baseline_bare_relay_msgs_per_s": round(relay, 1),
            "ratio": round(pipe["requests_per_s"] / relay, 3),
            "goal_ratio_min": 0.4,
        }
        report["throughput"]["requests_per_s"] = round(pipe["requests_per_s"], 1)
        report["throughput"]["pipeline_agents"] = sizes.pipeline_agents
        report["throughput"]["pipeline_agent_processes"] = len(pipeline.procs)
        # Which process the pipeline's CPU went to (2 shared cores: the busiest one caps it).
        report["throughput"]["cpu_s_by_process"] = {
            name: round(used - cpu_before.get(name, 0.0), 1)
            for name, used in stack.cpu_by_process().items()
        }
        per_isolation = cpu_per_unit(cpu_before, stack.cpu_by_process(), pipe["requests"])
        report["throughput"]["control_plane_cpu_ms_per_isolation"] = per_isolation[
            "control_plane_cpu_ms"
        ]
        report["throughput"]["agents_cpu_ms_per_applied_policy"] = per_isolation["agents_cpu_ms"]
        report["throughput"]["cpu_ms_per_isolation_by_process"] = per_isolation["by_process_cpu_ms"]
        # The relay runs in the bench driver; with the broker's share it is the same kind of
        # figure as the control plane's (which includes the broker and Redis).
        by_relay = relay_cpu["by_process_cpu_ms"]
        report["throughput"]["bare_relay_cpu_ms_per_message"] = by_relay.get("bench driver", 0.0)
        report["throughput"]["bare_relay_cpu_ms_per_message_with_broker"] = round(
            by_relay.get("bench driver", 0.0) + by_relay.get("kafka broker(s)", 0.0), 3
        )
        report["agents"] = {
            "rss_kib_per_idle_agent": per_agent_rss_kib(agent_rss),
            "rss_samples_agents_kib": agent_rss,
            "cpu_ms_per_applied_policy": per_isolation["agents_cpu_ms"],
            "goal_cpu_ms_per_applied_policy_max": 0.5,
            "goal_rss_kib_per_idle_agent_max": 20,
        }
        clock.mark("fig 1: bare relay and pipeline throughput")
        report["throughput"]["hops"] = await hops(stack)
        rate = sizes.latency_load_fraction * report["throughput"]["requests_per_s"]
        report["latency"] = await latency(driver, pipeline.endpoints, rate, sizes.latency_seconds)
        clock.mark("fig 1 hops; fig 2: latency")

        # Before the account-wide strict: a share of its endpoints, standard-isolated, loses an
        # entry (the strict below then isolates only the rest in standard mode first).
        report["revoke"] = await revoke(
            driver, strict_group.endpoints[: sizes.revoke_endpoints], "acct-strict"
        )
        clock.mark("fig 4: isolate and revoke an entry")
        report["account_strict"] = await account_strict(
            driver, strict_group.endpoints, "acct-strict", report["throughput"]["requests_per_s"]
        )
        clock.mark("fig 4: isolate the rest, account-wide strict")
        isolated = sum(1 for v in driver.isolated.values() if v)
        report["footprint"] = await footprint(
            stack, isolated, len(accounts), sizes.allowlist_entries
        )
        clock.mark("fig 6: Redis footprint")

        by_isolation = sorted(pipeline.endpoints, key=lambda e: driver.isolated.get(e, False))
        report["priority"] = await priority(
            driver, by_isolation, "acct-bench", sizes.backlog, sizes.strict_samples
        )
        clock.mark("fig 3: priority under backlog")
        report["agents_applied_reports_seen"] = watcher.applied_count
        await watcher.stop()
    finally:
        await stack.close()
        clock.mark("stop everything")
    if profile:
        report["profile"] = {
            name: summarize_profile(workdir / f"{name}.profile.txt")
            for name in ("isolation", "enforcer")
        }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


__all__ = ["BenchSizes", "run_bench"]
