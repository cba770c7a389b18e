"""``python -m bench.chaos [--full] [--report PATH]``: faults injected under isolation work, end state checked.

Every scenario drives isolate/release requests (accepted = acknowledged by Kafka, acks=all) and, for
the settings service, allowlist entries (accepted = HTTP 2xx), injects its fault, waits for the
system to settle, then counts against what was accepted:

- lost: an accepted request that issued no policy, an endpoint whose final state is not its last
  request's, or an acknowledged allowlist entry missing afterwards;
- wrong: an agent holding an older sequence than the isolation service's desired one, or a policy
  of another endpoint / account, or an allowlist entry of another account;
- duplicates: one request that issued policies under more than one sequence.

The scale scenario (``run_scale``; ``--only-scale`` runs it alone) does the same on 3 brokers, a
Redis Cluster and several instances of every service behind round-robin balancers, step by step
(``SCALE_STEPS``): SIGKILL an instance of each service, add one of each, remove one of each, kill
the busiest broker leader, kill a Redis master. Each step also strictly isolates one account
account-wide; an accepted strict that did not cover the whole account, or left its allowlist on,
or an endpoint of it not ending strict, counts as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from bench.figures import SOC, _end_offsets, _read_all
from bench.report import chaos_table, write_json
from bench.stack import SERVICES, GroupWatcher, Stack
from shared.messages import IsolateEndpoint, ReleaseEndpoint
from shared.topics import GroupName

log = logging.getLogger(__name__)

# How long one request may take to be accepted while a fault (broker restart...) lasts.
SEND_DEADLINE_S = 180.0

Fault = Callable[[], Coroutine[Any, Any, str]]

ACCOUNTS = ("acct-chaos-a", "acct-chaos-b")


@dataclass(frozen=True)
class ChaosSizes:
    """How much work each scenario drives; defaults are the reduced run."""

    agents_per_account: int = 25
    isolations: int = 600
    rate: float = 25.0
    kills_in_turn_rounds: int = 1
    kills_random: int = 1
    fuzz_http: int = 1000
    fuzz_kafka: int = 1000
    settle_s: float = 180.0
    single: bool = True
    cluster: bool = True
    # The scale scenario: 3 brokers, Redis Cluster, several instances of every service.
    scale: bool = True
    scale_instances: tuple[tuple[str, int], ...] = (
        ("settings", 2),
        ("isolation", 2),
        ("enforcer", 2),
    )
    # Which steps (SCALE_STEPS) and, for "kill", which services lose an instance.
    scale_steps: tuple[str, ...] = ("kill", "add", "remove", "leader", "redis-master")
    scale_kill: tuple[str, ...] = ("settings", "isolation", "enforcer")
    # Agents of the account that gets an account-wide strict in every scale step.
    strict_agents: int = 10

    @classmethod
    def full(cls) -> ChaosSizes:
        return cls(
            agents_per_account=100,
            isolations=10_000,
            rate=60.0,
            kills_in_turn_rounds=3,
            kills_random=3,
            fuzz_http=10_000,
            fuzz_kafka=10_000,
            settle_s=900.0,
            scale_instances=(("settings", 2), ("isolation", 3), ("enforcer", 2)),
            strict_agents=50,
        )

    @classmethod
    def tiny(cls) -> ChaosSizes:
        return cls(
            agents_per_account=8,
            isolations=120,
            rate=20.0,
            kills_in_turn_rounds=1,
            kills_random=0,
            fuzz_http=300,
            fuzz_kafka=300,
            settle_s=150.0,
            cluster=False,
            scale=False,
        )

    @classmethod
    def scale_test(cls) -> ChaosSizes:
        """The scale scenario's copy in the test suite: 2 isolation + 2 enforcer instances, one
        settings; one SIGKILL of an isolation and of an enforcer instance, one Redis master."""
        return cls(
            agents_per_account=10,
            isolations=400,
            rate=20.0,
            settle_s=150.0,
            scale_instances=(("settings", 1), ("isolation", 2), ("enforcer", 2)),
            scale_steps=("kill", "redis-master"),
            scale_kill=("isolation", "enforcer"),
            strict_agents=6,
        )


@dataclass
class Workload:
    """What was accepted during one scenario."""

    requests: dict[str, str] = field(default_factory=dict)  # request_id → endpoint
    last: dict[str, str] = field(default_factory=dict)  # endpoint → "standard"|"none"|"strict"
    entries: dict[str, set[str]] = field(default_factory=dict)  # account → addresses acked
    # account → endpoints an accepted (202) account-wide strict said it covers
    account_stricts: dict[str, int] = field(default_factory=dict)
    send_errors: int = 0


class Chaos:
    """One stack, its agents, and the bookkeeping of what each endpoint was last asked."""

    def __init__(
        self, stack: Stack, sizes: ChaosSizes, *, strict_accounts: tuple[str, ...] = ()
    ) -> None:
        self.stack = stack
        self.sizes = sizes
        self.accounts = (*ACCOUNTS, *strict_accounts)
        # Accounts whose endpoints are not toggled but strictly isolated account-wide per step.
        self.strict_accounts = strict_accounts
        self.endpoints: dict[str, str] = {}  # endpoint → account
        self.isolated: dict[str, bool] = {}
        self.addresses: dict[str, set[str]] = {a: set() for a in self.accounts}
        # Every address ever submitted per account: a write whose answer was lost (timeout, 503
        # while Kafka is down) may still be committed and published, legitimately.
        self.attempted: dict[str, set[str]] = {a: set() for a in self.accounts}
        self._entry_counter = 0

    @property
    def toggled(self) -> list[str]:
        """The endpoints the workload isolates and releases in turn."""
        return [e for e, a in self.endpoints.items() if a not in self.strict_accounts]

    async def setup(self) -> None:
        for account in self.accounts:
            await self.add_entry(account, Workload())
            await self.toggle_switch(account)
            count = (
                self.sizes.strict_agents
                if account in self.strict_accounts
                else self.sizes.agents_per_account
            )
            group = await self.stack.start_agents(account, count)
            for endpoint in group.endpoints:
                self.endpoints[endpoint] = account

    async def toggle_switch(self, account: str, enabled: bool = True) -> None:
        """Set the account's switch; retried while an instance is down (an answer 2xx or 4xx)."""
        deadline = time.monotonic() + SEND_DEADLINE_S
        async with httpx.AsyncClient(timeout=30) as http:
            while True:
                try:
                    response = await http.patch(
                        f"{self.stack.url('settings')}/v1/accounts/{account}/tooling-allowlist",
                        json={"enabled": enabled},
                        headers=self.stack.auth(),
                    )
                    if response.status_code < 500:
                        response.raise_for_status()
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"switch of {account} not set within {SEND_DEADLINE_S}s")
                await asyncio.sleep(0.5)

    async def add_entry(self, account: str, work: Workload) -> None:
        """Add one entry; it counts as accepted only on a 2xx answer."""
        self._entry_counter += 1
        n = self._entry_counter
        octet = self.accounts.index(account) + 1
        # 10/8 (RFC 1918) is a valid allowlist range; 198.18.0.0/15 (benchmarking) is refused.
        address = f"10.{octet}.{n // 250}.{n % 250 + 1}"
        self.attempted[account].add(address)
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.post(
                    f"{self.stack.url('settings')}/v1/accounts/{account}/tooling-allowlist/entries",
                    json={"name": f"rmm-{n}", "address": address},
                    headers=self.stack.auth(),
                )
        except httpx.HTTPError:
            return
        if response.status_code in (200, 201):
            work.entries.setdefault(account, set()).add(address)
            self.addresses[account].add(address)

    async def send_toggle(self, endpoint: str, work: Workload) -> None:
        topics = self.stack.topics
        message: IsolateEndpoint | ReleaseEndpoint
        if self.isolated.get(endpoint):
            message = ReleaseEndpoint(endpoint_id=endpoint, requested_by=SOC, reason="chaos")
            mode = "none"
        else:
            message = IsolateEndpoint(
                endpoint_id=endpoint, mode="standard", requested_by=SOC, reason="chaos"
            )
            mode = "standard"
        deadline = asyncio.get_running_loop().time() + SEND_DEADLINE_S
        while True:
            try:
                future = await self.stack.send(topics.isolation_requests, endpoint, message)
                await future
                break
            except Exception as exc:  # not accepted: the broker may be restarting; send again
                work.send_errors += 1
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(
                        f"request for {endpoint} not accepted within {SEND_DEADLINE_S:.0f}s"
                    ) from exc
                log.info("request not accepted, resending: %r", exc)
                if work.send_errors % 5 == 0:
                    try:
                        await self.stack.reset_producer()
                    except Exception as reset_exc:
                        # The broker is still down (KafkaConnectionError): the next send fails
                        # too and a later round resets again, until the deadline.
                        log.info("producer not restarted yet: %r", reset_exc)
                await asyncio.sleep(0.5)
        self.isolated[endpoint] = not self.isolated.get(endpoint)
        work.requests[message.request_id] = endpoint
        work.last[endpoint] = mode

    async def drive(
        self, count: int, fault: Fault | None = None, *, account_strict: bool = False
    ) -> tuple[Workload, str]:
        """Send ``count`` requests at the configured rate while ``fault`` runs; returns both.

        ``account_strict``: meanwhile, each strict account's endpoints are isolated again and
        then strictly isolated account-wide (allowlist switched off), as in an RMM compromise.
        """
        work = Workload()
        endpoints = self.toggled
        note = ""
        fault_task = asyncio.create_task(fault()) if fault is not None else None
        waves = [
            asyncio.create_task(self.account_strict_wave(account, work))
            for account in (self.strict_accounts if account_strict else ())
        ]
        interval = 1.0 / self.sizes.rate
        started = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        locks = {e: asyncio.Lock() for e in endpoints}

        async def one(endpoint: str) -> None:
            # One send in flight per endpoint keeps each endpoint's requests in order.
            async with locks[endpoint]:
                await self.send_toggle(endpoint, work)

        for i in range(count):
            delay = started + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(endpoints[i % len(endpoints)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if i % 50 == 25:
                account = ACCOUNTS[(i // 50) % len(ACCOUNTS)]
                entry = asyncio.create_task(self.add_entry(account, work))
                pending.add(entry)
                entry.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
        await asyncio.gather(*waves)
        if fault_task is not None:
            note = await fault_task
        return work, note

    async def account_strict_wave(self, account: str, work: Workload) -> None:
        """Switch the allowlist on, isolate every endpoint of ``account`` (standard; released
        first if isolated), wait until each is, then strictly isolate the account with the
        allowlist switched off. Accepted when the strict answers 202."""
        endpoints = [e for e, a in self.endpoints.items() if a == account]
        await self.toggle_switch(account, True)
        for endpoint in endpoints:
            if self.isolated.get(endpoint):
                await self.send_toggle(endpoint, work)
        for endpoint in endpoints:
            await self.send_toggle(endpoint, work)
        deadline = time.monotonic() + SEND_DEADLINE_S
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                states = await asyncio.gather(*(self.isolation_state(http, e) for e in endpoints))
                if all(s is not None and s.get("mode") == "standard" for s in states):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{account}'s endpoints not isolated within deadline")
                await asyncio.sleep(0.5)
            while True:
                try:
                    response = await http.post(
                        f"{self.stack.url('isolation')}/v1/accounts/{account}/strict-isolation",
                        json={"reason": "chaos: RMM compromised", "disable_allowlist": True},
                        headers=self.stack.auth(),
                    )
                    if response.status_code == 202:
                        work.account_stricts[account] = int(response.json()["endpoints"])
                        break
                    if response.status_code < 500:
                        response.raise_for_status()
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"account strict of {account} not accepted in time")
                await asyncio.sleep(0.5)
        for endpoint in endpoints:
            work.last[endpoint] = "strict"

    async def isolation_state(
        self, http: httpx.AsyncClient, endpoint: str
    ) -> dict[str, Any] | None:
        url = f"{self.stack.url('isolation')}/v1/endpoints/{endpoint}/isolation"
        try:
            response = await http.get(url, headers=self.stack.auth())
        except httpx.HTTPError:
            return None
        data: dict[str, Any] | None = response.json() if response.status_code == 200 else None
        return data

    async def caught_up(self, deadline: float) -> None:
        """Wait until the isolation lanes have committed past every request sent so far, then
        the enforcer lanes past every command issued by then.

        An endpoint's state alone does not show that its requests were handled: one that got an
        even number of toggles ends where it started, and under a backlog (the malformed
        scenario's 100-900 KB junk records) it looked settled before any of its requests was
        read, so its requests were counted lost while their commands were still to come.
        """
        topics = self.stack.topics
        for lanes in (
            (
                (GroupName.ISOLATION_REQUESTS, topics.isolation_requests),
                (GroupName.ISOLATION_REQUESTS_PRIORITY, topics.isolation_requests_priority),
            ),
            (
                (GroupName.ENFORCER_COMMANDS, topics.enforcer_commands),
                (GroupName.ENFORCER_COMMANDS_PRIORITY, topics.enforcer_commands_priority),
            ),
        ):
            for group, topic in lanes:
                ends = await _end_offsets(self.stack, topic)
                while True:
                    committed = await self._committed(topics.group(group), list(ends))
                    # -1: nothing committed yet, which is only behind if the partition has records.
                    behind = {
                        tp: end for tp, end in ends.items() if max(committed.get(tp, 0), 0) < end
                    }
                    if not behind:
                        break
                    if time.monotonic() > deadline:
                        log.warning("%s still behind on %s at the deadline", group, behind)
                        return
                    await asyncio.sleep(1.0)

    async def _committed(self, group: str, partitions: list[Any]) -> dict[Any, int]:
        """The group's committed offsets (-1 or absent: nothing committed yet)."""
        admin = AIOKafkaAdminClient(
            **self.stack.kafka_options, bootstrap_servers=self.stack.bootstrap
        )
        try:
            await admin.start()
            offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
        except Exception as exc:  # a broker restarting: ask again on the next round
            log.info("committed offsets of %s not read: %r", group, exc)
            return {}
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        return {tp: meta.offset for tp, meta in offsets.items()}

    async def settle_and_check(self, name: str, work: Workload, note: str) -> dict[str, Any]:
        """Wait until every request and command was handled and every endpoint's agent holds
        the desired policy, then count."""
        deadline = time.monotonic() + self.sizes.settle_s
        await self.caught_up(deadline)
        states: dict[str, dict[str, Any] | None] = {}
        held: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                states = dict(
                    zip(
                        self.endpoints,
                        await asyncio.gather(
                            *(self.isolation_state(http, e) for e in self.endpoints)
                        ),
                        strict=True,
                    )
                )
                held = {}
                for group in self.stack.agents:
                    held.update(group.held())
                if (
                    all(
                        _settled(states.get(e), held.get(e), work.last.get(e))
                        for e in self.endpoints
                    )
                    or time.monotonic() > deadline
                ):
                    break
                await asyncio.sleep(1.0)
        issued = await self.issued_sequences()
        lost = sum(1 for request_id in work.requests if not issued.get(request_id))
        duplicates = sum(1 for seqs in issued.values() if len(seqs) > 1)
        wrong = 0
        unsettled = 0
        for endpoint, account in self.endpoints.items():
            state, agent = states.get(endpoint), held.get(endpoint)
            expected = work.last.get(endpoint)
            if state is None or agent is None:
                unsettled += 1
                continue
            if expected is not None and state.get("mode") != expected:
                lost += 1
            if agent["sequence"] < int(state.get("desired_sequence") or 0):
                wrong += 1
                continue
            policy = agent.get("policy") or {}
            if policy and (
                policy.get("endpoint_id") != endpoint or policy.get("account_id") != account
            ):
                wrong += 1
                continue
            peers = {p["address"] for p in policy.get("allowed_outbound") or ()}
            if not peers <= self.attempted[account]:
                wrong += 1
        lost += await self.missing_entries(work)
        stricts_lost = await self.strict_accounts_lost(work)
        lost += stricts_lost
        return {
            "scenario": name,
            "accepted": len(work.requests) + sum(len(v) for v in work.entries.values()),
            "lost": lost,
            "wrong": wrong,
            "duplicates": duplicates,
            "unsettled_endpoints": unsettled,
            "requests": len(work.requests),
            "allowlist_entries_acked": sum(len(v) for v in work.entries.values()),
            "send_retries": work.send_errors,
            "account_stricts": dict(work.account_stricts),
            "account_strict_lost": stricts_lost,
            "note": note,
        }

    async def strict_accounts_lost(self, work: Workload) -> int:
        """An accepted account-wide strict that did not cover every endpoint of its account
        (each was isolated when it was sent) or left the allowlist on counts as lost."""
        lost = 0
        for account, covered in work.account_stricts.items():
            endpoints = [e for e, a in self.endpoints.items() if a == account]
            lost += max(0, len(endpoints) - covered)
            document = await self._get_json(
                f"{self.stack.url('settings')}/v1/accounts/{account}/tooling-allowlist"
            )
            lost += bool(document.get("enabled"))
        return lost

    async def _get_json(self, url: str) -> dict[str, Any]:
        """GET through the balancer, retried while an instance is down."""
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                try:
                    response = await http.get(url, headers=self.stack.auth())
                    if response.status_code == 200:
                        data: dict[str, Any] = response.json()
                        return data
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"GET {url} failed for 60 s")
                await asyncio.sleep(0.5)

    async def issued_sequences(self) -> dict[str, set[int]]:
        """request_id → the sequences its commands carried (both command lanes)."""
        issued: dict[str, set[int]] = {}
        for topic in (
            self.stack.topics.enforcer_commands,
            self.stack.topics.enforcer_commands_priority,
        ):
            for _, value in await _read_all(self.stack, topic):
                try:
                    data = orjson.loads(value)
                    request_id, sequence = data["request_id"], int(data["policy"]["sequence"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # the malformed scenario's junk: the DLQ check accounts for it
                issued.setdefault(request_id, set()).add(sequence)
        return issued

    async def missing_entries(self, work: Workload) -> int:
        missing = 0
        for account, acked in work.entries.items():
            document = await self._get_json(
                f"{self.stack.url('settings')}/v1/accounts/{account}/tooling-allowlist"
            )
            present = {e["address"] for e in document["entries"]}
            missing += len(acked - present)
        return missing


def _settled(
    state: dict[str, Any] | None, agent: dict[str, Any] | None, expected: str | None
) -> bool:
    if state is None or agent is None:
        return False
    desired = int(state.get("desired_sequence") or 0)
    if expected is not None and state.get("mode") != expected:
        return False
    return int(state.get("applied_sequence") or 0) == desired and agent["sequence"] >= desired


# --- faults ---------------------------------------------------------------------------


def kill_services(chaos: Chaos, rounds: int, extra: int, spacing: float) -> Fault:
    async def fault() -> str:
        order = [n for _ in range(rounds) for n in ("settings", "isolation", "enforcer")]
        order += [random.choice(("settings", "isolation", "enforcer")) for _ in range(extra)]
        for name in order:
            await asyncio.sleep(random.uniform(0.3, spacing))
            await chaos.stack.restart_service(name, kill=True)
        counts = {n: order.count(n) for n in ("settings", "isolation", "enforcer")}
        return "SIGKILL " + ", ".join(f"{n}×{c}" for n, c in counts.items())

    return fault


def restart_broker(chaos: Chaos, after: float) -> Fault:
    async def fault() -> str:
        await asyncio.sleep(after)
        started = time.perf_counter()
        await asyncio.to_thread(chaos.stack.kafka.restart)
        return f"broker restarted (down {time.perf_counter() - started:.1f}s)"

    return fault


def kill_leader(chaos: Chaos, after: float) -> Fault:
    async def fault() -> str:
        await asyncio.sleep(after)
        stack = chaos.stack
        busiest = None
        for topic in (stack.topics.isolation_requests, stack.topics.enforcer_commands):
            for tp, end in (await _end_offsets(stack, topic)).items():
                if busiest is None or end > busiest[1]:
                    busiest = (tp, end)
        assert busiest is not None
        admin = AIOKafkaAdminClient(**stack.kafka_options, bootstrap_servers=stack.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([busiest[0].topic])
        finally:
            await admin.close()
        leader = next(
            p["leader"]
            for p in described[0]["partitions"]
            if p["partition"] == busiest[0].partition
        )
        index = next(i for i, n in enumerate(stack.kafka.nodes) if n.node_id == leader)
        await asyncio.to_thread(stack.kafka.stop_node, index, kill=True)
        await asyncio.sleep(5)
        await asyncio.to_thread(stack.kafka.start_node, index)
        return (
            f"SIGKILL leader node {leader} of {busiest[0].topic}[{busiest[0].partition}], restarted"
        )

    return fault


def restart_redis(chaos: Chaos, after: float) -> Fault:
    async def fault() -> str:
        await asyncio.sleep(after)
        await asyncio.to_thread(chaos.stack.redis.restart, kill=True)
        return "redis SIGKILL + restart (AOF, appendfsync always)"

    return fault


# --- the scale scenario's faults ----------------------------------------------------------


@dataclass
class ScaleTally:
    """What the scale scenario did to the system, for its report."""

    instance_kills: dict[str, int] = field(default_factory=dict)  # service → SIGKILLs
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    broker_kills: int = 0
    redis_master_kills: int = 0
    max_instances: dict[str, int] = field(default_factory=dict)

    def seen(self, stack: Stack) -> None:
        for service in SERVICES:
            count = len(stack.instances_of(service))
            self.max_instances[service] = max(self.max_instances.get(service, 0), count)


def kill_instances(chaos: Chaos, tally: ScaleTally, services: tuple[str, ...]) -> Fault:
    """SIGKILL one instance of each service in ``services`` in turn (a random one), restart it."""

    async def fault() -> str:
        stack = chaos.stack
        done = []
        for service in services:
            await asyncio.sleep(random.uniform(0.5, 2.0))
            victim = random.choice(stack.instances_of(service)).name
            stack.kill_instance(victim)
            tally.instance_kills[service] = tally.instance_kills.get(service, 0) + 1
            # Down for a moment: its partitions wait for the group to notice (session timeout).
            await asyncio.sleep(random.uniform(0.5, 2.0))
            await stack.start_instance(victim)
            done.append(victim)
        return "SIGKILL + restart " + ", ".join(done)

    return fault


def add_instances(chaos: Chaos, tally: ScaleTally) -> Fault:
    """One more instance of every service while work flows: each joins its groups (rebalance)."""

    async def fault() -> str:
        added = []
        for service in SERVICES:
            await asyncio.sleep(random.uniform(0.5, 1.5))
            added.append(await chaos.stack.add_instance(service))
        tally.added.extend(added)
        tally.seen(chaos.stack)
        return "added " + ", ".join(added)

    return fault


def remove_instances(chaos: Chaos, tally: ScaleTally) -> Fault:
    """Stop (SIGTERM) the oldest instance of every service that has more than one (rebalance)."""

    async def fault() -> str:
        removed = []
        for service in SERVICES:
            running = chaos.stack.instances_of(service)
            if len(running) < 2:
                continue
            await asyncio.sleep(random.uniform(0.5, 1.5))
            await chaos.stack.remove_instance(running[0].name)
            removed.append(running[0].name)
        tally.removed.extend(removed)
        return "removed " + (", ".join(removed) or "nothing")

    return fault


def kill_redis_master(chaos: Chaos, tally: ScaleTally, after: float) -> Fault:
    """SIGKILL a Redis Cluster master; its replica is promoted; the old master is restarted
    (it rejoins as a replica)."""

    async def fault() -> str:
        await asyncio.sleep(after)
        cluster = chaos.stack.redis_cluster
        assert cluster is not None
        masters = await asyncio.to_thread(cluster.master_indexes)
        victim = random.choice(masters)
        port = cluster.ports[victim]
        started = time.perf_counter()
        await asyncio.to_thread(cluster.stop_node, victim, kill=True)
        tally.redis_master_kills += 1
        deadline = time.monotonic() + 60
        while True:
            now = await asyncio.to_thread(cluster.master_indexes)
            if len(now) == len(masters) and victim not in now:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica promoted for Redis node {port} within 60 s")
            await asyncio.sleep(0.2)
        promoted = (set(now) - set(masters)).pop()
        failover_s = time.perf_counter() - started
        await asyncio.sleep(2)
        await asyncio.to_thread(cluster.start_node, victim)
        await asyncio.to_thread(cluster.wait_healthy, 60.0)
        return (
            f"SIGKILL Redis master :{port}; replica :{cluster.ports[promoted]} promoted in "
            f"{failover_s:.1f}s; old master back as a replica"
        )

    return fault


def _counted_leader_kill(chaos: Chaos, tally: ScaleTally, after: float) -> Fault:
    inner = kill_leader(chaos, after)

    async def fault() -> str:
        note = await inner()
        tally.broker_kills += 1
        return note

    return fault


# name → (report row, the fault of that step)
SCALE_STEPS: dict[str, tuple[str, Callable[[Chaos, ScaleTally, float], Fault]]] = {
    "kill": (
        "scale: SIGKILL + restart an instance of each service",
        lambda chaos, tally, after: kill_instances(chaos, tally, chaos.sizes.scale_kill),
    ),
    "add": (
        "scale: add an instance of each service (rebalance)",
        lambda chaos, tally, after: add_instances(chaos, tally),
    ),
    "remove": (
        "scale: remove an instance of each service (rebalance)",
        lambda chaos, tally, after: remove_instances(chaos, tally),
    ),
    "leader": ("scale: SIGKILL busiest broker leader", _counted_leader_kill),
    "redis-master": ("scale: SIGKILL a Redis master (replica promoted)", kill_redis_master),
}

SCALE_STRICT_ACCOUNT = "acct-chaos-s"


# --- malformed traffic ------------------------------------------------------------------


def _junk(rng: random.Random) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if choice == 1:
        return b'{"type": "IsolateEndpoint", "endpoint_id": '  # truncated JSON
    if choice == 2:
        return orjson.dumps({"type": "IsolateEndpoint", "endpoint_id": 42, "mode": ["x"]})
    if choice == 3:
        return orjson.dumps({"type": "NoSuchType", "id": "x"})
    if choice == 4:
        return b'{"a": "' + b"x" * rng.randrange(100_000, 900_000) + b'"}'
    if choice == 5:
        return b"[" * 5000 + b"]" * 5000
    if choice == 6:
        return orjson.dumps(
            {"type": "EnforcePolicy", "request_id": "r", "policy": {"sequence": -1}}
        )
    if choice == 7:
        return "\u202e\U0001f4a5 ünïcode".encode() * rng.randrange(1, 50)
    return b"null"


async def fuzz_kafka(
    stack: Stack, count: int, rng: random.Random
) -> tuple[set[tuple[str, int, int]], int]:
    """Raw bad records on every consumed topic; returns their (topic, partition, offset)."""
    topics = [
        stack.topics.isolation_requests,
        stack.topics.isolation_requests_priority,
        stack.topics.isolation_status,
        stack.topics.enforcer_commands,
        stack.topics.enforcer_commands_priority,
        stack.topics.settings_allowlist,
        stack.topics.endpoints,
    ]
    producer = AIOKafkaProducer(
        **stack.kafka_options,
        bootstrap_servers=stack.bootstrap,
        acks="all",
        linger_ms=5,
        max_request_size=2 * 1024 * 1024,
    )
    await producer.start()
    sent: set[tuple[str, int, int]] = set()
    try:
        futures = []
        for i in range(count):
            topic = topics[i % len(topics)]
            futures.append(
                await producer.send(topic, _junk(rng), key=f"fuzz-{rng.randrange(50)}".encode())
            )
            if len(futures) >= 200:
                for meta in await asyncio.gather(*futures):
                    sent.add((meta.topic, meta.partition, meta.offset))
                futures = []
        for meta in await asyncio.gather(*futures):
            sent.add((meta.topic, meta.partition, meta.offset))
    finally:
        await producer.stop()
    return sent, len(sent)


async def fuzz_http(stack: Stack, count: int, rng: random.Random) -> dict[str, int]:
    """Bad bodies and tokens on every write route; counts answers by class."""
    settings, isolation, enforcer = (stack.url(n) for n in ("settings", "isolation", "enforcer"))
    targets = [
        ("POST", f"{settings}/v1/accounts/acct-chaos-a/tooling-allowlist/entries"),
        ("PATCH", f"{settings}/v1/accounts/acct-chaos-a/tooling-allowlist"),
        ("POST", f"{isolation}/v1/endpoints/nope/isolation"),
        ("POST", f"{isolation}/v1/accounts/acct-fuzz/strict-isolation"),
        ("POST", f"{enforcer}/v1/agents/enroll"),
        ("POST", f"{enforcer}/v1/agents/x/policy-status"),
    ]
    bad_tokens = ["Bearer x.y.z", "Bearer ", "Basic abc", "Bearer " + "a" * 5000]
    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "errors": 0}
    gate = asyncio.Semaphore(20)
    async with httpx.AsyncClient(timeout=30) as http:

        async def one(i: int) -> None:
            method, url = targets[i % len(targets)]
            headers = (
                dict(stack.auth())
                if rng.random() < 0.8
                else {"Authorization": rng.choice(bad_tokens)}
            )
            headers["Content-Type"] = "application/json"
            body = _junk(rng)
            if rng.random() < 0.3:
                body = orjson.dumps(
                    rng.choice(
                        [
                            {"name": "x" * 65, "address": "10.0.0.1"},
                            {"name": "ok", "address": "rmm.example.com"},
                            {"name": "ok", "address": "010.1.1.1"},
                            {"enabled": "yes"},
                            {"mode": "loose"},
                            {"account_id": "", "enrollment_key": 1},
                            {"sequence": "a", "status": "applied"},
                        ]
                    )
                )
            async with gate:
                try:
                    response = await http.request(method, url, content=body, headers=headers)
                except httpx.HTTPError:
                    counts["errors"] += 1
                    return
            counts[f"{response.status_code // 100}xx"] = (
                counts.get(f"{response.status_code // 100}xx", 0) + 1
            )

        await asyncio.gather(*(one(i) for i in range(count)))
    return counts


async def dlq_records(stack: Stack) -> dict[tuple[str, int, int], str]:
    out: dict[tuple[str, int, int], str] = {}
    for _, value in await _read_all(stack, stack.topics.dlq):
        data = orjson.loads(value)
        out[(data["source_topic"], data["source_partition"], data["source_offset"])] = data[
            "reason"
        ]
    return out


async def malformed(chaos: Chaos) -> dict[str, Any]:
    stack = chaos.stack
    rng = random.Random(6)
    starts = {n: s.starts for n, s in stack.services.items()}
    holder: dict[str, Any] = {}

    async def fault() -> str:
        holder["bad"], _ = await fuzz_kafka(stack, chaos.sizes.fuzz_kafka, rng)
        holder["http"] = await fuzz_http(stack, chaos.sizes.fuzz_http, rng)
        return ""

    work, _ = await chaos.drive(max(60, chaos.sizes.isolations // 4), fault)
    result = await chaos.settle_and_check("malformed traffic (HTTP + Kafka fuzz)", work, "")
    # The replicas and the status lane dead-letter their share too; they may lag behind the
    # request lanes that settle_and_check waited for.
    deadline = time.monotonic() + chaos.sizes.settle_s
    bad: set[tuple[str, int, int]] = holder["bad"]
    while True:
        dlq = await dlq_records(stack)
        missing = [k for k in bad if not dlq.get(k)]
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(2)
    crashed = [n for n, s in stack.services.items() if not s.alive() or s.starts != starts[n]]
    http_counts = holder["http"]
    result.update(
        fuzz_http=http_counts,
        fuzz_kafka=len(bad),
        bad_kafka_without_dlq_reason=len(missing),
        bad_kafka_without_dlq_reason_by_topic=dict(Counter(topic for topic, _, _ in missing)),
        crashed_services=crashed,
    )
    result["note"] = (
        f"{sum(http_counts.values())} HTTP bodies: {http_counts.get('5xx', 0)}×5xx; "
        f"{len(bad)} bad records, {len(bad) - len(missing)} in DLQ with a reason; "
        f"crashes: {len(crashed)}"
    )
    # A 5xx, a crash or a bad record missing from the DLQ is a failure of this scenario.
    result["failures"] = http_counts.get("5xx", 0) + len(crashed) + len(missing)
    return result


# --- runner ---------------------------------------------------------------------------


async def _single_node_scenarios(workdir: Path, sizes: ChaosSizes) -> list[dict[str, Any]]:
    # appendfsync always: a SIGKILLed Redis keeps every acknowledged write (everysec may lose 1 s).
    stack = Stack(workdir / "single", appendfsync="always")
    (workdir / "single").mkdir(parents=True, exist_ok=True)
    results = []
    try:
        await stack.start_infra()
        await stack.start_services()
        chaos = Chaos(stack, sizes)
        await chaos.setup()
        duration = sizes.isolations / sizes.rate
        kills = 3 * sizes.kills_in_turn_rounds + sizes.kills_random
        work, note = await chaos.drive(
            sizes.isolations,
            kill_services(
                chaos, sizes.kills_in_turn_rounds, sizes.kills_random, max(1.0, duration / kills)
            ),
        )
        results.append(await chaos.settle_and_check("SIGKILL services + restart", work, note))
        small = max(60, sizes.isolations // 4)
        work, note = await chaos.drive(small, restart_redis(chaos, small / sizes.rate / 3))
        results.append(await chaos.settle_and_check("Redis SIGKILL + restart (AOF)", work, note))
        results.append(await malformed(chaos))
        # Last on this stack: a broker restart that the services do not survive would otherwise
        # show up in every later scenario too.
        work, note = await chaos.drive(small, restart_broker(chaos, small / sizes.rate / 3))
        results.append(await chaos.settle_and_check("Kafka broker restart", work, note))
    finally:
        await stack.close()
    return results


async def _cluster_scenario(workdir: Path, sizes: ChaosSizes) -> dict[str, Any]:
    (workdir / "cluster").mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir / "cluster", kafka_nodes=3, kafka_heap="384m", appendfsync="always")
    try:
        await stack.start_infra()
        await stack.start_services()
        chaos = Chaos(stack, sizes)
        await chaos.setup()
        small = max(60, sizes.isolations // 4)
        work, note = await chaos.drive(small, kill_leader(chaos, small / sizes.rate / 3))
        return await chaos.settle_and_check("3-node cluster: SIGKILL busiest leader", work, note)
    finally:
        await stack.close()


async def run_scale(workdir: Path, sizes: ChaosSizes) -> dict[str, Any]:
    """The scale scenario: 3 brokers, Redis Cluster, N instances of every service, its steps in
    turn on one stack, each driving isolations, releases, allowlist entries and an account-wide
    strict; returns {"steps": [rows], "scale": what ran and what was done to it}."""
    (workdir / "scale").mkdir(parents=True, exist_ok=True)
    instances = dict(sizes.scale_instances)
    stack = Stack(
        workdir / "scale",
        kafka_nodes=3,
        kafka_heap="384m",
        appendfsync="always",
        instances=instances,
        redis_cluster=True,
    )
    tally = ScaleTally()
    watcher = GroupWatcher(stack)
    steps = []
    try:
        await stack.start_infra()
        await stack.start_services()
        tally.seen(stack)
        chaos = Chaos(stack, sizes, strict_accounts=(SCALE_STRICT_ACCOUNT,))
        await chaos.setup()
        await watcher.start()
        small = max(60, sizes.isolations // 4)
        for step in sizes.scale_steps:
            title, make_fault = SCALE_STEPS[step]
            fault = make_fault(chaos, tally, small / sizes.rate / 3)
            work, note = await chaos.drive(small, fault, account_strict=True)
            tally.seen(stack)
            steps.append(await chaos.settle_and_check(title, work, note))
    finally:
        await watcher.stop()
        await stack.close()
    assert stack.redis_cluster is not None
    summary = {
        "instances_at_start": instances,
        "instances_max": tally.max_instances,
        "brokers": len(stack.kafka.nodes),
        "redis_cluster_nodes": len(stack.redis_cluster.nodes),
        "redis_cluster_masters": stack.redis_cluster.masters,
        "redis_cluster_services": sorted(stack.cluster_services),
        "kills": {
            "service_instances": tally.instance_kills,
            "broker_leader": tally.broker_kills,
            "redis_master": tally.redis_master_kills,
        },
        "instances_added": tally.added,
        "instances_removed": tally.removed,
        "membership_changes_caused": len(stack.membership_events),
        "membership_events": [
            {"at": round(at, 3), "action": action, "instance": name}
            for at, action, name in stack.membership_events
        ],
        "consumer_groups_observed": watcher.snapshot(),
        "rebalances_observed": sum(watcher.member_changes.values()),
    }
    return {"steps": steps, "scale": summary}


def scale_summary(scale: dict[str, Any]) -> str:
    kills = scale["kills"]
    return (
        f"scale: instances {scale['instances_at_start']} (max {scale['instances_max']}), "
        f"{scale['brokers']} brokers, Redis Cluster {scale['redis_cluster_nodes']} nodes "
        f"({scale['redis_cluster_masters']} masters; used by "
        f"{', '.join(scale['redis_cluster_services'])}); kills: instances "
        f"{kills['service_instances']}, broker leader {kills['broker_leader']}, Redis master "
        f"{kills['redis_master']}; membership changes caused {scale['membership_changes_caused']}"
        f", group member-set changes observed {scale['rebalances_observed']}"
    )


async def run_chaos(workdir: Path, sizes: ChaosSizes) -> dict[str, Any]:
    started = time.perf_counter()
    scenarios = await _single_node_scenarios(workdir, sizes) if sizes.single else []
    if sizes.cluster:
        scenarios.append(await _cluster_scenario(workdir, sizes))
    result: dict[str, Any] = {"sizes": asdict(sizes)}
    if sizes.scale:
        scale = await run_scale(workdir, sizes)
        scenarios.extend(scale["steps"])
        result["scale"] = scale["scale"]
    result.update(
        scenarios=scenarios, workdir=str(workdir), wall_s=round(time.perf_counter() - started, 1)
    )
    return result


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    full: Annotated[
        bool, typer.Option(help="Issue 6's sizes (10,000 isolations, 10,000 fuzzed).")
    ] = False,
    report: Annotated[Path, typer.Option(help="Where the JSON report goes.")] = Path(
        "artifacts/chaos-report.json"
    ),
    cluster: Annotated[bool, typer.Option(help="Also run the 3-node cluster scenario.")] = True,
    scale: Annotated[
        bool,
        typer.Option(
            help="Also run the scale scenario (3 brokers, Redis Cluster, several instances of "
            "every service; kills, added and removed instances, a broker leader and a Redis "
            "master killed)."
        ),
    ] = True,
    only_scale: Annotated[
        bool, typer.Option(help="Run the scale scenario alone (not the single-node ones).")
    ] = False,
) -> None:
    """Run every fault scenario and print scenario x (accepted, lost, wrong, duplicates)."""
    from bench.__main__ import scratch_dir

    logging.basicConfig(level=logging.ERROR)
    # Brokers are killed on purpose here: the clients' reconnect chatter is expected noise.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    sizes = ChaosSizes.full() if full else ChaosSizes()
    sizes = replace(sizes, cluster=cluster and not only_scale, scale=scale or only_scale)
    sizes = replace(sizes, single=not only_scale)
    workdir = scratch_dir("hostiso-chaos-")
    typer.echo(f"chaos: {'full' if full else 'reduced'} sizes, logs in {workdir}")
    result = asyncio.run(run_chaos(workdir, sizes))
    write_json(report, result)
    typer.echo(chaos_table(result))
    if "scale" in result:
        typer.echo("\n" + scale_summary(result["scale"]))
    failed = sum(
        s["lost"] + s["wrong"] + s["duplicates"] + s.get("failures", 0) for s in result["scenarios"]
    )
    typer.echo(f"\nreport: {report}  ({result['wall_s']} s)")
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
