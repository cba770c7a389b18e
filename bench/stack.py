"""The system under test: real Kafka and Redis, the three services and simulated agents as processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.lb import RoundRobinBalancer
from shared.auth import mint_token
from shared.config import DEV_ENROLLMENT_SECRET, DEV_JWT_SECRET
from shared.enrollment import enrollment_key
from shared.infra import KafkaCluster, LocalRedis
from shared.infra.proc import free_port, spawn, stop
from shared.infra.redis_cluster import LocalRedisCluster
from shared.kafka import FETCH_MAX_WAIT_MS, ensure_topics, make_producer, wait_topics_ready
from shared.messages import Message
from shared.topics import TOPIC_SPECS, GroupName, Topics

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("settings", "isolation", "enforcer")

# The services that use the Redis Cluster of a ``Stack(redis_cluster=True)``; the others would use
# the stack's single redis-server beside it. Every service runs on Redis Cluster now (keys
# hash-tagged, every script in one slot); the override narrows it for a comparison run.
REDIS_CLUSTER_SERVICES: frozenset[str] = frozenset(SERVICES)


def redis_cluster_services() -> frozenset[str]:
    """``REDIS_CLUSTER_SERVICES``, or ``HOSTISO_BENCH_REDIS_CLUSTER_SERVICES`` (comma-separated)
    to try a branch whose services run on Redis Cluster without editing the constant."""
    chosen = os.environ.get("HOSTISO_BENCH_REDIS_CLUSTER_SERVICES")
    if chosen is None:
        return REDIS_CLUSTER_SERVICES
    names = frozenset(n.strip() for n in chosen.split(",") if n.strip())
    unknown = names - set(SERVICES)
    if unknown:
        raise ValueError(
            f"HOSTISO_BENCH_REDIS_CLUSTER_SERVICES: unknown services {sorted(unknown)}"
        )
    return names


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ServiceProc:
    """One instance of a service run as ``python -m services.<service>`` (optionally under
    pyinstrument); ``name`` is its instance id (the service's name when it runs alone)."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    profile_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    service: str = ""

    def __post_init__(self) -> None:
        self.service = self.service or self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        args = [sys.executable, "-m", f"services.{self.service}"]
        if self.profile_path is not None:
            args = [
                sys.executable,
                "-m",
                "pyinstrument",
                "--renderer",
                "text",
                "-o",
                str(self.profile_path),
                "-m",
                f"services.{self.service}",
            ]
        self.proc = spawn(args, log_path=self.log_path, cwd=ROOT, env=self.env)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        stop(self.proc, kill=True)

    def stop(self, timeout: float = 30.0) -> None:
        if self.profile_path is not None and self.alive():
            # pyinstrument writes its report when the program ends on KeyboardInterrupt.
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        stop(self.proc, timeout=timeout)

    async def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{self.name} exited before it was ready:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/ready", timeout=2)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s (log: {self.log_path})")


# Enrollments a group of simulated agents has in flight at once, all its processes together.
# What the enforcer answers within the agents' timeout is its enrollment rate times that
# timeout (Little's law): at the ≈ 10 enrollments/s a loaded 2-core machine gives while
# thousands of agents already poll, 250 in flight (50 in each of 5 processes) waited past the
# 30 s timeout and left orphan endpoints; 50 wait ≈ 5 s, and at 100/s still keep it busy.
FLEET_ENROLL_CONCURRENCY = 50

# Simulated agents per process: one Python process serving every agent would be what the
# benchmark measures (one core at most), not the enforcer and the pipeline in front of it.
AGENTS_PER_PROCESS = 100


@dataclass
class AgentGroup:
    """Simulated agents of one account, ``per_process`` to a ``python -m agent --simulated``
    process, and the endpoints they enrolled."""

    account_id: str
    count: int
    state_dir: Path
    log_path: Path
    per_process: int = AGENTS_PER_PROCESS
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    profile_path: Path | None = None
    # "pyisession" keeps every frame, for `pyinstrument --load=PATH --show-all` afterwards.
    profile_renderer: str = "text"
    # Enrollments in flight at once over all the group's processes, split among them
    # (``--enroll-concurrency`` of each; 0: no bound).
    enroll_concurrency: int = FLEET_ENROLL_CONCURRENCY
    # Filled by ``Stack.start_agents``: seconds until every agent held an endpoint id, and the
    # account's endpoints on endpoints.v1 that no agent holds (enrollments answered too late).
    enroll_s: float = 0.0
    orphan_endpoints: int = 0

    @property
    def shares(self) -> list[int]:
        """Agents per process: as even as possible, none above ``per_process``."""
        processes = max(1, -(-self.count // max(1, self.per_process)))
        base, extra = divmod(self.count, processes)
        return [base + (1 if i < extra else 0) for i in range(processes)]

    @property
    def enroll_concurrency_per_process(self) -> int:
        if not self.enroll_concurrency:
            return 0
        return max(1, self.enroll_concurrency // len(self.shares))

    def state_dir_of(self, process: int) -> Path:
        return self.state_dir / f"p{process}"

    def state_paths(self) -> list[Path]:
        """Every agent's state file, in process then agent order (``agent.bootstrap``'s layout:
        ``agent-<i>/`` per agent when a process holds several)."""
        paths = []
        for process, count in enumerate(self.shares):
            root = self.state_dir_of(process)
            if count == 1:
                paths.append(root / "agent-state.json")
            else:
                paths += [root / f"agent-{i}" / "agent-state.json" for i in range(count)]
        return paths

    def start(self, enforcer_url: str, env: dict[str, str], poll_wait: float) -> None:
        for index, count in enumerate(self.shares):
            self.procs.append(self._spawn(index, count, enforcer_url, env, poll_wait))

    def _spawn(
        self, index: int, count: int, enforcer_url: str, env: dict[str, str], poll_wait: float
    ) -> subprocess.Popen[bytes]:
        runner = [sys.executable]
        if self.profile_path is not None:
            runner += [
                "-m",
                "pyinstrument",
                "-r",
                self.profile_renderer,
                "-o",
                f"{self.profile_path}.p{index}",
            ]
        return spawn(
            [
                *runner,
                "-m",
                "agent",
                "--simulated",
                "--count",
                str(count),
                "--account-id",
                self.account_id,
                "--enrollment-key",
                enrollment_key(DEV_ENROLLMENT_SECRET, self.account_id),
                "--enforcer-url",
                enforcer_url,
                "--hostname",
                f"{self.account_id}-host-p{index}",
                "--state-dir",
                str(self.state_dir_of(index)),
                "--enroll-concurrency",
                str(self.enroll_concurrency_per_process),
                "--platform-addresses",
                "127.0.0.1",
                "--dns-resolvers",
                "",
                "--poll-wait",
                str(poll_wait),
                "--log-level",
                "WARNING",
            ],
            log_path=self.log_path,
            cwd=ROOT,
            env=env,
        )

    def stop(self) -> None:
        if self.profile_path is not None:
            # pyinstrument writes its report when the program ends on KeyboardInterrupt.
            running = [p for p in self.procs if p.poll() is None]
            for proc in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
            for proc in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(60)
        for proc in self.procs:
            stop(proc)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    @property
    def label(self) -> str:
        return f"agents:{self.account_id}({self.count} in {len(self.procs)} proc)"

    def held(self) -> dict[str, dict[str, Any]]:
        """What each agent holds now, from its state file: endpoint → {sequence, policy}."""
        out: dict[str, dict[str, Any]] = {}
        for path in self.state_dir.rglob("agent-state.json"):
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                state = orjson.loads(path.read_bytes())
                if state.get("agent_id"):
                    signed = state.get("last_policy") or {}
                    out[state["agent_id"]] = {
                        "sequence": int(state.get("last_applied_sequence") or 0),
                        "policy": signed.get("policy"),
                    }
        return out


class Stack:
    """Kafka (1 or 3 nodes), Redis with AOF, the services and agent groups, in one work dir.

    ``instances`` (e.g. ``{"isolation": 3, "enforcer": 2}``) runs that many instances of a
    service, each its own process, HTTP port and ``HOSTISO_INSTANCE_ID`` (``isolation-1`` …),
    behind a round-robin balancer per service (``url(service)``): the agents talk to the
    enforcer's, the isolation service to the settings'. ``redis_cluster=True`` also starts a
    3-master Redis Cluster (``redis_replicas`` per master) that the services in
    ``cluster_services`` (default ``redis_cluster_services()``) use; the others keep the single
    redis-server.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        kafka_nodes: int = 1,
        appendfsync: str = "everysec",
        kafka_heap: str = "512m",
        service_env: dict[str, str] | None = None,
        instances: dict[str, int] | None = None,
        redis_cluster: bool = False,
        redis_replicas: int = 1,
        cluster_services: Iterable[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.kafka = KafkaCluster(nodes_count=kafka_nodes, heap=kafka_heap)
        self.redis = LocalRedis(appendfsync=appendfsync)
        self.redis_cluster: LocalRedisCluster | None = None
        self.cluster_services: frozenset[str] = frozenset()
        if redis_cluster:
            self.redis_cluster = LocalRedisCluster(
                masters=3,
                replicas=redis_replicas,
                appendfsync=appendfsync,
                root=workdir / "redis-cluster",
            )
            chosen = redis_cluster_services() if cluster_services is None else cluster_services
            self.cluster_services = frozenset(chosen)
        unknown = set(instances or {}) - set(SERVICES)
        if unknown:
            raise ValueError(f"instances: unknown services {sorted(unknown)}")
        self.instance_counts = {name: 1 for name in SERVICES} | dict(instances or {})
        # Balanced (several instances possible) only when asked: the single-instance benchmarks
        # measure the services, not a proxy in the driver's process.
        self.balanced = instances is not None
        self.balancers: dict[str, RoundRobinBalancer] = {}
        tag = uuid.uuid4().hex[:8]
        self.topics = Topics(f"b{tag}.")
        self.redis_prefix = f"b{tag}:"
        # One instance per service (the first running one): what single-instance code talks to.
        self.services: dict[str, ServiceProc] = {}
        # Every instance by its id, in start order.
        self.instances: dict[str, ServiceProc] = {}
        # What the harness did to instances: (time, action, instance id), for the reports.
        self.membership_events: list[tuple[float, str, str]] = []
        self._next_index: dict[str, int] = {name: 0 for name in SERVICES}
        self._profiled: set[str] = set()
        self._ports: dict[str, int] = {}
        self.agents: list[AgentGroup] = []
        self.producer: Any = None
        # Concurrent senders that all failed reset at once: one at a time, or each replaced the
        # producer another had just started and leaked it ("Unclosed AIOKafkaProducer").
        self._reset_lock = asyncio.Lock()
        self._extra_env = service_env or {}
        self.soc_token = mint_token(DEV_JWT_SECRET, sub="bench-soc", role="soc", ttl_s=86400)

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def kafka_options(self) -> dict[str, Any]:
        """The bench's own clients' connection options (empty: the bench broker is PLAINTEXT)."""
        return self.kafka.client_options()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.soc_token}"}

    async def start_infra(self) -> None:
        await asyncio.to_thread(self.kafka.start)
        await asyncio.to_thread(self.redis.start)
        if self.redis_cluster is not None:
            (self.workdir / "redis-cluster").mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self.redis_cluster.start)
        await ensure_topics(
            self.bootstrap,
            self.topics,
            replication_factor=self.kafka.replication_factor,
            min_insync_replicas=self.kafka.min_insync_replicas,
            options=self.kafka_options,
        )
        await wait_topics_ready(
            self.bootstrap, [self.topics(s.name) for s in TOPIC_SPECS], options=self.kafka_options
        )
        self.producer = make_producer(
            self.bootstrap, client_id="hostiso-bench", options=self.kafka_options
        )
        await self.producer.start()

    def redis_url_for(self, service: str) -> str:
        """The Redis ``service`` uses: the cluster when it is in ``cluster_services``."""
        if self.redis_cluster is not None and service in self.cluster_services:
            return self.redis_cluster.url
        return self.redis.url

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOSTISO_DEV="1",
            HOSTISO_KAFKA_BOOTSTRAP=self.bootstrap,
            HOSTISO_REDIS_URL=self.redis.url,
            HOSTISO_TOPIC_PREFIX=self.topics.prefix,
            HOSTISO_REDIS_PREFIX=self.redis_prefix,
            HOSTISO_LOG_LEVEL="WARNING",
            # Benchmarks enroll thousands of agents of one account at once: lift the
            # per-account enrollment rate limit and endpoint cap for them.
            HOSTISO_ENROLLMENT_RATE_PER_MINUTE="100000",
            HOSTISO_ENROLLMENT_MAX_ENDPOINTS_PER_ACCOUNT="10000000",
        )
        env.update(self._extra_env)
        return env

    def url(self, service: str) -> str:
        """Where clients reach ``service``: its balancer, or its single instance."""
        if service in self.balancers:
            return self.balancers[service].url
        return self.services[service].url

    def instances_of(self, service: str) -> list[ServiceProc]:
        return [i for i in self.instances.values() if i.service == service]

    def _settings_url(self) -> str:
        if "settings" in self.balancers:
            return self.balancers["settings"].url
        return f"http://127.0.0.1:{self._ports['settings']}"

    def _isolation_url(self) -> str:
        if "isolation" in self.balancers:
            return self.balancers["isolation"].url
        return f"http://127.0.0.1:{self._ports['isolation']}"

    def _new_instance(self, service: str, port: int | None = None) -> ServiceProc:
        self._next_index[service] += 1
        name = f"{service}-{self._next_index[service]}" if self.balanced else service
        port = port or free_port()
        env = dict(
            self.base_env(),
            HOSTISO_SETTINGS_URL=self._settings_url(),
            HOSTISO_ISOLATION_URL=self._isolation_url(),
            HOSTISO_REDIS_URL=self.redis_url_for(service),
            HOSTISO_HTTP_PORT=str(port),
            HOSTISO_INSTANCE_ID=name,
        )
        instance = ServiceProc(
            name=name,
            service=service,
            port=port,
            env=env,
            log_path=self.workdir / f"{name}.log",
            profile_path=(
                self.workdir / f"{name}.profile.txt" if service in self._profiled else None
            ),
        )
        self.instances[name] = instance
        self.services.setdefault(service, instance)
        return instance

    def _rebalance(self, service: str) -> None:
        if service in self.balancers:
            self.balancers[service].set_backends([i.port for i in self.instances_of(service)])

    async def start_services(
        self, names: Iterable[str] = SERVICES, *, profile: Iterable[str] = ()
    ) -> None:
        self._profiled = set(profile)
        names = list(names)
        if self.balanced:
            for service in SERVICES:
                if service not in self.balancers:
                    self.balancers[service] = await RoundRobinBalancer(service).start()
        else:
            # Ports chosen up front: the isolation service is told the settings service's.
            self._ports = {name: free_port() for name in SERVICES}
        started = []
        for service in names:
            for _ in range(self.instance_counts[service]):
                instance = self._new_instance(service, self._ports.get(service))
                instance.start()
                started.append(instance)
        for instance in started:
            await instance.wait_ready()
        for service in names:
            self._rebalance(service)

    def _event(self, action: str, name: str) -> None:
        self.membership_events.append((time.time(), action, name))

    async def add_instance(self, service: str) -> str:
        """Start one more instance of ``service`` (a new group member: a rebalance)."""
        instance = self._new_instance(service)
        instance.start()
        await instance.wait_ready()
        self._rebalance(service)
        self._event("add", instance.name)
        return instance.name

    async def remove_instance(self, name: str) -> None:
        """Stop an instance for good (SIGTERM: it leaves its groups, a rebalance)."""
        instance = self.instances.pop(name)
        self._rebalance(instance.service)
        await asyncio.to_thread(instance.stop)
        self._event("remove", name)
        if self.services.get(instance.service) is instance:
            rest = self.instances_of(instance.service)
            if rest:
                self.services[instance.service] = rest[0]
            else:
                del self.services[instance.service]

    def kill_instance(self, name: str) -> None:
        """SIGKILL, as a crash would; it stays down until ``start_instance``."""
        self.instances[name].kill()
        self._event("kill", name)

    async def start_instance(self, name: str) -> None:
        """Start a stopped or killed instance again (same id and port)."""
        instance = self.instances[name]
        instance.start()
        await instance.wait_ready()
        self._event("start", name)

    async def restart_instance(self, name: str, *, kill: bool = True) -> None:
        instance = self.instances[name]
        await asyncio.to_thread(instance.kill if kill else instance.stop)
        self._event("kill" if kill else "stop", name)
        await self.start_instance(name)

    async def restart_service(self, name: str, *, kill: bool = True) -> None:
        """Restart ``name``: an instance id, or a service (its first instance)."""
        instance = self.instances.get(name) or self.services[name]
        await self.restart_instance(instance.name, kill=kill)

    async def start_agents(
        self,
        account_id: str,
        count: int,
        *,
        poll_wait: float = 20.0,
        timeout: float = 300.0,
        profile: str | None = None,
        per_process: int = AGENTS_PER_PROCESS,
    ) -> AgentGroup:
        """Start ``count`` simulated agents and wait until each one's enrollment is on endpoints.v1."""
        index = len(self.agents)
        group = AgentGroup(
            account_id=account_id,
            count=count,
            state_dir=self.workdir / f"agents{index}",
            log_path=self.workdir / f"agents{index}.log",
            profile_path=self.workdir / f"agents{index}.profile.{profile}" if profile else None,
            profile_renderer=profile or "text",
            per_process=per_process,
        )
        started = time.perf_counter()
        group.start(self.url("enforcer"), self.base_env(), poll_wait)
        self.agents.append(group)
        group.endpoints = await self.enrolled_endpoints(
            account_id, count, timeout=timeout, group=group
        )
        group.enroll_s = time.perf_counter() - started
        return group

    async def enrolled_endpoints(
        self, account_id: str, count: int, *, timeout: float, group: AgentGroup | None = None
    ) -> list[str]:
        """The endpoint ids of ``count`` enrolled agents of ``account_id``, once each is on
        endpoints.v1.

        With ``group``, the ids are the ones its agents hold (their state files): an enrollment
        the enforcer finished after the agent had given up is on endpoints.v1 too, under an id no
        agent holds, and counting it would hand the bench an endpoint nobody polls for. Those
        orphans are counted in ``group.orphan_endpoints``. Without ``group`` the first ``count``
        ids of the account on endpoints.v1 are taken (callers that start agents another way).
        """
        found: list[str] = []
        seen: set[str] = set()
        held: dict[Path, str] = {}
        pending = group.state_paths() if group is not None else []
        deadline = time.monotonic() + timeout
        next_scan = 0.0
        consumer = AIOKafkaConsumer(
            **self.kafka_options, bootstrap_servers=self.bootstrap, enable_auto_commit=False
        )
        await consumer.start()
        try:
            topic = self.topics.endpoints
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batch.values():
                    for record in records:
                        data = orjson.loads(record.value or b"{}")
                        endpoint = data.get("endpoint_id")
                        if data.get("account_id") == account_id and endpoint not in seen:
                            seen.add(endpoint)
                            found.append(endpoint)
                if group is None:
                    if len(found) >= count:
                        return found[:count]
                elif time.monotonic() >= next_scan or len(held) == count:
                    # The state files of agents not enrolled yet; a second is plenty (reading
                    # thousands every 200 ms would be the bench's own CPU figure).
                    next_scan = time.monotonic() + 1.0
                    pending = [path for path in pending if not _held_id(path, held)]
                    if not pending and all(e in seen for e in held.values()):
                        group.orphan_endpoints = len(seen - set(held.values()))
                        return [held[path] for path in group.state_paths()]
                if time.monotonic() > deadline:
                    progress = f"{len(found)}/{count} agents of {account_id} enrolled"
                    if group is not None:
                        progress = (
                            f"{len(held)}/{count} agents of {account_id} hold an endpoint id"
                            f" ({len(seen)} ids of the account on endpoints.v1)"
                        )
                    raise TimeoutError(progress)
        finally:
            await consumer.stop()

    async def send(self, topic: str, key: str, message: Message | bytes) -> Any:
        """Queue a send; the returned future resolves when the broker acknowledged it."""
        value = message if isinstance(message, bytes) else message.to_bytes()
        return await self.producer.send(topic, value, key=key.encode())

    async def reset_producer(self) -> None:
        """A fresh producer (new producer id): aiokafka's idempotent producer does not recover
        from OutOfOrderSequenceNumber after a broker restart."""
        async with self._reset_lock:
            with contextlib.suppress(Exception):
                await self.producer.stop()
            self.producer = make_producer(
                self.bootstrap, client_id="hostiso-bench", options=self.kafka_options
            )
            await self.producer.start()

    def cpu_by_process(self) -> dict[str, float]:
        out = {name: cpu_seconds(s.pid) for name, s in self.instances.items() if s.alive()}
        for group in self.agents:
            out[group.label] = sum(cpu_seconds(pid) for pid in group.pids)
        out["bench driver"] = cpu_seconds(os.getpid())
        # The broker and Redis share the same 2 cores: their CPU is part of the pipeline's cost.
        out["kafka broker(s)"] = sum(cpu_seconds(n.proc.pid) for n in self.kafka.nodes if n.proc)
        if self.redis.proc is not None:
            out["redis"] = cpu_seconds(self.redis.proc.pid)
        if self.redis_cluster is not None:
            out["redis cluster"] = sum(cpu_seconds(pid) for pid in self.redis_cluster.pids)
        return out

    async def close(self) -> None:
        for group in self.agents:
            group.stop()
        for instance in self.instances.values():
            instance.stop()
        for balancer in self.balancers.values():
            await balancer.close()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        await asyncio.to_thread(self.redis.close)
        if self.redis_cluster is not None:
            await asyncio.to_thread(self.redis_cluster.close)
        await asyncio.to_thread(self.kafka.stop)


# The consumer groups the services' instances share (the replicas read without a group).
CONSUMER_GROUPS = (
    GroupName.ISOLATION_REQUESTS,
    GroupName.ISOLATION_REQUESTS_PRIORITY,
    GroupName.ISOLATION_STATUS,
    GroupName.ENFORCER_COMMANDS,
    GroupName.ENFORCER_COMMANDS_PRIORITY,
)


class GroupWatcher:
    """Samples the services' consumer groups (DescribeGroups) and counts what it sees change:
    the member set of a group (each change is a new generation: a rebalance) and the time
    spent in a rebalance state. DescribeGroups does not carry the generation id itself, so two
    rebalances between samples count once: the figure is a lower bound."""

    def __init__(self, stack: Stack, interval_s: float = 0.5) -> None:
        self._stack = stack
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self.groups = [stack.topics.group(name) for name in CONSUMER_GROUPS]
        self.members: dict[str, frozenset[str]] = {}
        self.member_changes: dict[str, int] = {g: 0 for g in self.groups}
        self.rebalancing_samples: dict[str, int] = {g: 0 for g in self.groups}
        self.errors = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-watcher")

    async def _run(self) -> None:
        admin = AIOKafkaAdminClient(
            **self._stack.kafka_options, bootstrap_servers=self._stack.bootstrap
        )
        await admin.start()
        try:
            while True:
                try:
                    await self._sample(admin)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a broker is being killed: sample again later
                    self.errors += 1
                    log.info("group watcher: %r", exc)
                await asyncio.sleep(self._interval)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    async def _sample(self, admin: AIOKafkaAdminClient) -> None:
        for group in self.groups:
            for response in await admin.describe_consumer_groups([group]):
                for described in response.groups:
                    _error, group_id, state, _ptype, _protocol, members = described[:6]
                    if state in ("PreparingRebalance", "CompletingRebalance"):
                        self.rebalancing_samples[group_id] += 1
                    current = frozenset(str(m[0]) for m in members)
                    before = self.members.get(group_id)
                    if before is not None and current != before and state == "Stable":
                        self.member_changes[group_id] += 1
                    if state == "Stable":
                        self.members[group_id] = current

    def snapshot(self) -> dict[str, Any]:
        return {
            "member_set_changes": dict(self.member_changes),
            "members_now": {g: len(m) for g, m in self.members.items()},
            "samples_in_rebalance": dict(self.rebalancing_samples),
        }

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class StatusWatcher:
    """Follows ``isolation.status.v1`` and resolves expectations "endpoint applied a newer sequence"."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self.applied_seq: dict[str, int] = {}
        self.applied_count = 0
        self.failed_count = 0
        self._expect: dict[str, list[tuple[int, asyncio.Future[tuple[int, float]]]]] = {}

    async def start(self, *, from_beginning: bool = False) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            # A record wakes the fetch at once (fetch_min_bytes=1); 20 ms made the idle
            # watcher's fetches the broker's largest load in the CPU-per-isolation figure.
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            client_id="hostiso-bench-status",
        )
        await self._consumer.start()
        await self._consumer._client.force_metadata_update()
        parts = self._consumer.partitions_for_topic(self._topic) or set()
        tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        if from_beginning:
            await self._consumer.seek_to_beginning(*tps)
        else:
            await self._consumer.seek_to_end(*tps)
            for tp in tps:
                await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name="status-watcher")

    async def _run(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker restarts in chaos: keep following
                log.warning("status watcher: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for records in batch.values():
                for record in records:
                    self._on(record.value or b"{}")

    def _on(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        endpoint = data.get("endpoint_id")
        if data.get("status") != "applied" or not isinstance(endpoint, str):
            self.failed_count += data.get("status") == "failed"
            return
        sequence = int(data.get("sequence") or 0)
        self.applied_count += 1
        if sequence > self.applied_seq.get(endpoint, 0):
            self.applied_seq[endpoint] = sequence
        waiting = self._expect.get(endpoint)
        if not waiting:
            return
        occurred = _timestamp(data.get("occurred_at"))
        keep = []
        for above, future in waiting:
            if sequence > above and not future.done():
                future.set_result((sequence, occurred))
            elif not future.done():
                keep.append((above, future))
        if keep:
            self._expect[endpoint] = keep
        else:
            del self._expect[endpoint]

    def expect(self, endpoint: str, above: int | None = None) -> asyncio.Future[tuple[int, float]]:
        """A future for the next applied report of ``endpoint`` with a sequence above ``above``
        (default: the highest applied so far); resolves to (sequence, reported-at epoch s)."""
        future: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()
        floor = self.applied_seq.get(endpoint, 0) if above is None else above
        self._expect.setdefault(endpoint, []).append((floor, future))
        return future

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def _timestamp(value: Any) -> float:
    from datetime import datetime

    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return time.time()


def _held_id(path: Path, held: dict[Path, str]) -> bool:
    """Whether the agent whose state file is ``path`` holds an endpoint id (noted in ``held``)."""
    try:
        agent_id = orjson.loads(path.read_bytes()).get("agent_id")
    except (OSError, orjson.JSONDecodeError):
        return False
    if isinstance(agent_id, str) and agent_id:
        held[path] = agent_id
        return True
    return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
