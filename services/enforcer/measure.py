"""``python -m services.enforcer.measure``: delivery latency, waiting-agent capacity, strict override under backlog.

``--cpu-cycles N`` measures only the enforcer's CPU per isolation instead (see
``measure_cpu_per_isolation``), optionally under pyinstrument (``--profile PATH``).

Runs the enforcer as a real process against the Kafka and Redis given by HOSTISO_KAFKA_BOOTSTRAP /
HOSTISO_REDIS_URL (or starts local ones), plays agents with httpx, and prints the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from shared.infra.proc import free_port, spawn, stop
from shared.kafka import KafkaOptions, ensure_topics, make_producer, publish
from shared.messages import EnforcePolicy, FrozenPolicy, utcnow
from shared.topics import Topics

SEQUENCE_MARK = 987654321


def command_template(mode: str = "standard") -> bytes:
    """A small valid EnforcePolicy with placeholders for the endpoint and the sequence."""
    policy = FrozenPolicy(
        policy_id="P",
        endpoint_id="ENDPOINT",
        account_id="acct-bench",
        sequence=SEQUENCE_MARK,
        mode=mode,
        platform=("198.51.100.1",),
        settings_version=1,
        issued_at=utcnow(),
        issued_by="bench",
    )
    return EnforcePolicy(request_id="R", policy=policy).model_dump_json().encode()


def render_command(template: bytes, endpoint_id: str, sequence: int) -> bytes:
    return template.replace(b"ENDPOINT", endpoint_id.encode()).replace(
        str(SEQUENCE_MARK).encode(), str(sequence).encode()
    )


async def produce_backlog(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    endpoints: int = 10_000,
    prefix: str = "bk",
    options: KafkaOptions | None = None,
) -> float:
    """Put ``count`` commands for ``endpoints`` fake endpoints on ``topic`` fast; returns seconds."""
    template = command_template()
    producer = AIOKafkaProducer(
        **(options or {}),
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=20,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    started = time.monotonic()
    try:
        for i in range(count):
            endpoint_id = f"{prefix}-{i % endpoints}"
            value = render_command(template, endpoint_id, i // endpoints + 1)
            await producer.send(topic, value, key=endpoint_id.encode())
            if i % 20_000 == 19_999:
                await producer.flush()
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - started


async def committed_total(
    bootstrap: str, group_id: str, *, options: KafkaOptions | None = None
) -> int:
    """Sum of the committed offsets of a consumer group (records it has consumed)."""
    admin = AIOKafkaAdminClient(**(options or {}), bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return sum(max(0, meta.offset) for meta in offsets.values())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stack:
    """Kafka and Redis for a measurement: the configured ones, or local ones started here."""

    def __init__(self) -> None:
        self.bootstrap = os.environ.get("HOSTISO_KAFKA_BOOTSTRAP", "")
        self.redis_url = os.environ.get("HOSTISO_REDIS_URL", "")
        self._owned: list[Any] = []

    def __enter__(self) -> Stack:
        from shared.infra import LocalKafka, LocalRedis

        if not self.bootstrap:
            kafka = LocalKafka()
            kafka.start()
            self._owned.append(kafka)
            self.bootstrap = kafka.bootstrap
        if not self.redis_url:
            redis = LocalRedis().start()
            self._owned.append(redis)
            self.redis_url = redis.url
        return self

    def __exit__(self, *exc: object) -> None:
        for owned in reversed(self._owned):
            with contextlib.suppress(Exception):
                owned.stop() if hasattr(owned, "bootstrap") else owned.close()


@contextlib.contextmanager
def enforcer_process(
    stack: Stack, prefix: str, log_dir: Path, *, profile: Path | None = None
) -> Iterator[tuple[str, int]]:
    """The enforcer as a process (under pyinstrument, writing ``profile``, if given)."""
    port = free_port()
    env = dict(
        os.environ,
        HOSTISO_DEV="1",
        HOSTISO_KAFKA_BOOTSTRAP=stack.bootstrap,
        HOSTISO_REDIS_URL=stack.redis_url,
        HOSTISO_TOPIC_PREFIX=f"{prefix}.",
        HOSTISO_REDIS_PREFIX=f"{prefix}:",
        HOSTISO_HTTP_PORT=str(port),
        # Benchmarks enroll thousands of agents of one account at once: lift the
        # per-account enrollment rate limit and endpoint cap for them.
        HOSTISO_ENROLLMENT_RATE_PER_MINUTE="100000",
        HOSTISO_ENROLLMENT_MAX_ENDPOINTS_PER_ACCOUNT="10000000",
        HOSTISO_LOG_LEVEL="WARNING",
    )
    runner = [sys.executable]
    if profile is not None:
        runner += ["-m", "pyinstrument", "-r", "text", "-o", str(profile)]
    proc = spawn([*runner, "-m", "services.enforcer"], log_path=log_dir / "enforcer.log", env=env)
    try:
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        if profile is not None and proc.poll() is None:
            # pyinstrument writes its report when the program ends on KeyboardInterrupt.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(Exception):
                proc.wait(120)
        stop(proc)


async def wait_ready(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/ready", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"enforcer at {url} not ready after {timeout}s")


async def enroll_many(
    http: httpx.AsyncClient, count: int, concurrency: int = 100
) -> list[tuple[str, str]]:
    key = enrollment_key(DEV_ENROLLMENT_SECRET, "acct-bench")
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[str, str]:
        async with gate:
            response = await http.post(
                "/v1/agents/enroll",
                json={
                    "account_id": "acct-bench",
                    "enrollment_key": key,
                    "hostname": f"h{i}",
                    "platform": "linux",
                },
            )
            response.raise_for_status()
            body = response.json()
            return body["agent_id"], body["agent_token"]

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@contextlib.asynccontextmanager
async def started_producer(bootstrap: str) -> AsyncIterator[Any]:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def policy_for(endpoint_id: str, sequence: int, mode: str = "standard") -> EnforcePolicy:
    return EnforcePolicy.model_validate_json(
        render_command(command_template(mode), endpoint_id, sequence)
    )


async def measure_delivery(stack: Stack, samples: int, log_dir: Path) -> dict[str, float]:
    """Stored → waiting agent answered, and produced → answered, one waiting agent at a time."""
    prefix = f"m{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{prefix}.")
    await ensure_topics(stack.bootstrap, topics)
    from redis.asyncio import Redis

    redis = Redis.from_url(stack.redis_url)
    with enforcer_process(stack, prefix, log_dir) as (url, _pid):
        await wait_ready(url)
        async with (
            httpx.AsyncClient(base_url=url, timeout=90) as http,
            started_producer(stack.bootstrap) as producer,
        ):
            ((agent_id, token),) = await enroll_many(http, 1)
            auth = {"Authorization": f"Bearer {token}"}
            stored_to_answer: list[float] = []
            produced_to_answer: list[float] = []
            for sequence in range(1, samples + 1):
                waiting = asyncio.create_task(
                    http.get(
                        f"/v1/agents/{agent_id}/policy",
                        params={"after": sequence - 1, "wait": 30},
                        headers=auth,
                    )
                )
                await asyncio.sleep(0.02)  # let the poll reach the server and wait
                produced = time.time()
                await publish(
                    producer,
                    topics.enforcer_commands_priority,
                    agent_id,
                    policy_for(agent_id, sequence, "strict"),
                )
                response = await waiting
                answered = time.time()
                assert response.status_code == 200, response.status_code
                stored_ms = await redis.hget(f"{prefix}:enforcer:policy:{agent_id}", "stored_at_ms")
                stored_to_answer.append(answered - int(stored_ms or 0) / 1000)
                produced_to_answer.append(answered - produced)
    await redis.aclose()
    return {
        "stored_to_answered_p50_ms": 1000 * statistics.median(stored_to_answer),
        "stored_to_answered_p99_ms": 1000 * percentile(stored_to_answer, 0.99),
        "produced_to_answered_p50_ms": 1000 * statistics.median(produced_to_answer),
        "produced_to_answered_p99_ms": 1000 * percentile(produced_to_answer, 0.99),
    }


async def measure_strict_override(stack: Stack, backlog: int, log_dir: Path) -> dict[str, float]:
    """A strict command on the priority lane → the waiting agent, with ``backlog`` normal commands queued."""
    prefix = f"m{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{prefix}.")
    await ensure_topics(stack.bootstrap, topics)
    produce_s = (
        await produce_backlog(stack.bootstrap, topics.enforcer_commands, backlog)
        if backlog
        else 0.0
    )
    with enforcer_process(stack, prefix, log_dir) as (url, _pid):
        await wait_ready(url)
        async with (
            httpx.AsyncClient(base_url=url, timeout=90) as http,
            started_producer(stack.bootstrap) as producer,
        ):
            ((agent_id, token),) = await enroll_many(http, 1)
            waiting = asyncio.create_task(
                http.get(
                    f"/v1/agents/{agent_id}/policy",
                    params={"after": 0, "wait": 60},
                    headers={"Authorization": f"Bearer {token}"},
                )
            )
            await asyncio.sleep(0.05)
            sent = time.monotonic()
            await publish(
                producer,
                topics.enforcer_commands_priority,
                agent_id,
                policy_for(agent_id, 1, "strict"),
            )
            response = await waiting
            latency = time.monotonic() - sent
            consumed = await committed_total(stack.bootstrap, f"{prefix}.enforcer-normal")
            assert response.status_code == 200
    return {
        "backlog": backlog,
        "backlog_produce_s": produce_s,
        "strict_latency_ms": 1000 * latency,
        "normal_consumed_when_strict_arrived": consumed,
    }


CLIENT_SCRIPT = r"""
import asyncio, sys, time, httpx, orjson
async def main():
    url, wait = sys.argv[1], float(sys.argv[2])
    agents = orjson.loads(sys.stdin.buffer.read())
    limits = httpx.Limits(max_connections=len(agents) + 10, max_keepalive_connections=len(agents) + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=wait + 60) as http:
        async def one(agent_id, token):
            r = await http.get(f"/v1/agents/{agent_id}/policy", params={"after": 0, "wait": wait},
                               headers={"Authorization": f"Bearer {token}"})
            return r.status_code, time.time()
        results = await asyncio.gather(*(one(a, t) for a, t in agents), return_exceptions=True)
    codes = {}
    last = 0.0
    for r in results:
        key = type(r).__name__ if isinstance(r, BaseException) else str(r[0])
        codes[key] = codes.get(key, 0) + 1
        if not isinstance(r, BaseException):
            last = max(last, r[1])
    print(orjson.dumps({"codes": codes, "last_answer": last}).decode(), flush=True)
asyncio.run(main())
"""


async def measure_capacity(stack: Stack, agents: int, log_dir: Path) -> dict[str, Any]:
    """How many long-polling agents one enforcer process holds, its RSS, and time to answer them all."""
    prefix = f"m{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{prefix}.")
    await ensure_topics(stack.bootstrap, topics)
    with enforcer_process(stack, prefix, log_dir) as (url, pid):
        await wait_ready(url)
        rss_idle = rss_mib(pid)
        async with httpx.AsyncClient(base_url=url, timeout=90) as http:
            started = time.monotonic()
            enrolled = await enroll_many(http, agents)
            enroll_s = time.monotonic() - started
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT_SCRIPT,
                url,
                "55",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert client.stdin is not None
            client.stdin.write(orjson.dumps(enrolled))
            await client.stdin.drain()
            client.stdin.close()
            deadline = time.monotonic() + 120
            waiting = 0.0
            while time.monotonic() < deadline:
                metrics = (await http.get("/metrics")).text
                waiting = next(
                    float(line.split()[1])
                    for line in metrics.splitlines()
                    if line.startswith("hostiso_enforcer_waiting_agents ")
                )
                if waiting >= agents:
                    break
                await asyncio.sleep(0.5)
            rss_waiting = rss_mib(pid)
            template = command_template("strict")
            producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all", linger_ms=10)
            await producer.start()
            sent = time.time()
            for agent_id, _ in enrolled:
                await producer.send(
                    topics.enforcer_commands_priority,
                    render_command(template, agent_id, 1),
                    key=agent_id.encode(),
                )
            await producer.flush()
            await producer.stop()
            out, _ = await client.communicate()
            result = orjson.loads(out)
    return {
        "agents": agents,
        "enroll_s": enroll_s,
        "waiting_seen": waiting,
        "rss_idle_mib": rss_idle,
        "rss_with_waiting_mib": rss_waiting,
        "answers": result["codes"],
        "all_answered_after_send_s": result["last_answer"] - sent,
    }


IDLE_CLIENT_SCRIPT = r"""
import asyncio, random, sys, orjson
from agent.lighthttp import LightHttpClient
async def main():
    url, wait = sys.argv[1], float(sys.argv[2])
    agents = orjson.loads(sys.stdin.buffer.read())
    async def one(i, agent_id, token):
        # Started over 20 s (a fleet does not arrive in one instant), then spread over the wait.
        await asyncio.sleep(20 * i / len(agents))
        client = LightHttpClient(url, None)
        auth = {"Authorization": f"Bearer {token}"}
        # The first wait is spread over the interval so the re-polls arrive evenly, as a fleet's do.
        first = random.uniform(1.0, wait)
        while True:
            try:
                await client.request("GET", f"{url}/v1/agents/{agent_id}/policy", headers=auth,
                                     params={"after": 0, "wait": round(first, 3)}, timeout=wait + 60)
            except Exception:
                await asyncio.sleep(1)
            first = wait
    await asyncio.gather(*(one(i, a, t) for i, (a, t) in enumerate(agents)))
asyncio.run(main())
"""


async def _metric(http: httpx.AsyncClient, prefix: str) -> float:
    """The sum of every sample of ``/metrics`` whose line starts with ``prefix``."""
    text = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def _polls(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hostiso_http_requests_total{")
        and 'route="/v1/agents/{agent_id}/policy"' in line
        and 'method="GET"' in line
    )


@contextlib.asynccontextmanager
async def idle_agents(
    http: httpx.AsyncClient, url: str, enrolled: list[tuple[str, str]], wait: float
) -> AsyncIterator[None]:
    """``enrolled`` agents long-polling ``wait`` seconds for ever (light client, own process)."""
    if not enrolled:
        yield
        return
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", IDLE_CLIENT_SCRIPT, url, str(wait), stdin=asyncio.subprocess.PIPE
    )
    assert client.stdin is not None
    client.stdin.write(orjson.dumps(enrolled))
    await client.stdin.drain()
    client.stdin.close()
    try:
        deadline = time.monotonic() + 180
        # A few are between two polls at any moment (or retrying a refused one); an enforcer
        # that cannot hold them all within the deadline is measured with what it holds.
        while await _metric(http, "hostiso_enforcer_waiting_agents ") < 0.95 * len(enrolled):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        yield
    finally:
        client.kill()
        await client.wait()


async def idle_poll_cpu(http: httpx.AsyncClient, pid: int, seconds: float) -> dict[str, float]:
    """Enforcer CPU over ``seconds`` of idle polls only: per poll answered, and per second."""
    polls_before, cpu_before, started = await _polls(http), cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    polls, cpu = await _polls(http) - polls_before, cpu_seconds(pid) - cpu_before
    elapsed = time.monotonic() - started
    return {
        "seconds": round(elapsed, 1),
        "polls": polls,
        "polls_per_s": round(polls / elapsed, 1),
        "cpu_ms_per_s": round(1000 * cpu / elapsed, 1),
        "cpu_ms_per_poll": round(1000 * cpu / polls, 3) if polls else float("nan"),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def policy_template(peers: int) -> bytes:
    """A standard EnforcePolicy with ``peers`` allowed entries (the bench's allowlist size)."""
    from shared.messages import AllowedPeer

    policy = FrozenPolicy(
        policy_id="P",
        endpoint_id="ENDPOINT",
        account_id="acct-bench",
        sequence=SEQUENCE_MARK,
        mode="standard",
        allowed_outbound=tuple(
            AllowedPeer(
                name=f"RMM relay {i}",
                address=f"203.0.{i // 250}.{i % 250 + 1}",
                ports=(443,),
                protocol="tcp",
            )
            for i in range(peers)
        ),
        platform=("198.51.100.1",),
        settings_version=1,
        issued_at=utcnow(),
        issued_by="bench",
    )
    return EnforcePolicy(request_id="R", policy=policy).model_dump_json().encode()


async def measure_cpu_per_isolation(
    stack: Stack,
    agents: int,
    cycles: int,
    log_dir: Path,
    *,
    peers: int = 5,
    profile: Path | None = None,
    spy: Path | None = None,
    idle: int = 0,
    idle_wait: float = 55.0,
    idle_window: float = 20.0,
) -> dict[str, Any]:
    """Enforcer CPU per isolation, the part of the bench's figure 1 the enforcer does.

    With ``idle`` agents more, long-polling ``idle_wait`` seconds and never commanded (the rest
    of a fleet, in a process of their own), it also measures the enforcer's CPU over
    ``idle_window`` seconds of their polls alone (per poll), after the same window with no agent
    at all (the enforcer's own background).

    ``agents`` agents (the simulated agents' light HTTP client) long-poll; for each, a closed
    loop commands a new policy on the normal lane, waits until its agent got it and reported it
    applied, and commands the next. Each cycle is what one isolation costs the enforcer: one
    command stored and signed, the waiting poll answered, a new poll, a status report published.
    """
    from agent.lighthttp import LightHttpClient

    prefix = f"m{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{prefix}.")
    await ensure_topics(stack.bootstrap, topics)
    template = policy_template(peers)
    with enforcer_process(stack, prefix, log_dir, profile=profile) as (url, pid):
        await wait_ready(url)
        async with (
            httpx.AsyncClient(base_url=url, timeout=90) as http,
            started_producer(stack.bootstrap) as producer,
            contextlib.AsyncExitStack() as exits,
        ):
            enrolled = await enroll_many(http, agents + idle)
            enrolled, idlers = enrolled[:agents], enrolled[agents:]
            idle_figures: dict[str, Any] = {}
            if idle:
                idle_figures["background"] = await idle_poll_cpu(http, pid, idle_window)
            await exits.enter_async_context(idle_agents(http, url, idlers, idle_wait))
            if idle:
                idle_figures["idle_polls"] = await idle_poll_cpu(http, pid, idle_window)
                idle_figures["idle_waiting"] = await _metric(
                    http, "hostiso_enforcer_waiting_agents "
                )
            applied: dict[str, asyncio.Queue[int]] = {a: asyncio.Queue() for a, _ in enrolled}
            stop_polling = asyncio.Event()
            errors: list[str] = []

            async def agent(agent_id: str, token: str) -> None:
                client = LightHttpClient(url, None)
                auth = {"Authorization": f"Bearer {token}"}
                held = 0
                while not stop_polling.is_set():
                    try:
                        answer = await client.request(
                            "GET",
                            f"{url}/v1/agents/{agent_id}/policy",
                            headers=auth,
                            params={"after": held, "wait": 20},
                            timeout=40,
                        )
                    except httpx.HTTPError as exc:
                        errors.append(f"poll {exc!r}")
                        await asyncio.sleep(0.5)
                        continue
                    if answer.status_code == 204:
                        continue
                    if answer.status_code != 200:
                        errors.append(f"poll {answer.status_code}")
                        await asyncio.sleep(0.5)
                        continue
                    signed = orjson.loads(answer.content)
                    policy = signed["policy"]
                    try:
                        report = await client.request(
                            "POST",
                            f"{url}/v1/agents/{agent_id}/policy-status",
                            headers=auth,
                            json={
                                "sequence": policy["sequence"],
                                "policy_id": policy["policy_id"],
                                "status": "applied",
                                "rules_sha256": "a" * 64,
                            },
                            timeout=40,
                        )
                        if report.status_code != 202:
                            errors.append(f"report {report.status_code}")
                    except httpx.HTTPError as exc:
                        # Counted, and the cycle goes on: one lost report must not hang the run.
                        errors.append(f"report {exc!r}")
                    held = policy["sequence"]
                    applied[agent_id].put_nowait(held)

            async def commander(agent_id: str, first: int, count: int) -> None:
                for sequence in range(first, first + count):
                    await producer.send(
                        topics.enforcer_commands,
                        render_command(template, agent_id, sequence),
                        key=agent_id.encode(),
                    )
                    while await applied[agent_id].get() < sequence:
                        pass

            pollers = [asyncio.create_task(agent(a, t)) for a, t in enrolled]
            # Warm-up: one isolation each (connections, scripts, JIT-free but caches warm).
            await asyncio.gather(*(commander(a, 1, 1) for a, _ in enrolled))
            # py-spy (if asked) samples only the measured isolations, and only on-CPU stacks.
            spying = (
                None
                if spy is None
                else await asyncio.create_subprocess_exec(
                    "py-spy", "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(spy)
                )
            )
            before = {"enforcer": cpu_seconds(pid), "kafka": _kafka_cpu(stack)}
            redis_before = await _redis_cpu(stack.redis_url)
            started = time.monotonic()
            await asyncio.gather(*(commander(a, 2, cycles) for a, _ in enrolled))
            elapsed = time.monotonic() - started
            if spying is not None:
                spying.send_signal(signal.SIGINT)
                await spying.wait()
            after = {"enforcer": cpu_seconds(pid), "kafka": _kafka_cpu(stack)}
            redis_after = await _redis_cpu(stack.redis_url)
            stop_polling.set()
            for task in pollers:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
    isolations = agents * cycles
    per = {name: 1000 * (after[name] - before[name]) / isolations for name in before}
    per["redis"] = 1000 * (redis_after - redis_before) / isolations
    return {
        "agents": agents,
        "isolations": isolations,
        "seconds": round(elapsed, 2),
        "isolations_per_s": round(isolations / elapsed, 1),
        "cpu_ms_per_isolation": {k: round(v, 3) for k, v in per.items()},
        "errors": errors[:10],
        **({"idle_agents": idle, "idle_wait_s": idle_wait, **idle_figures} if idle else {}),
    }


def _kafka_cpu(stack: Stack) -> float:
    total = 0.0
    for owned in stack._owned:
        for node in getattr(owned, "nodes", ()):
            if node.proc is not None:
                total += cpu_seconds(node.proc.pid)
    return total


async def _redis_cpu(url: str) -> float:
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    try:
        info = await redis.info("cpu")
    finally:
        await redis.aclose()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def main(
    samples: Annotated[int, typer.Option(help="delivery latency samples")] = 200,
    agents: Annotated[
        str, typer.Option(help="comma-separated waiting-agent counts")
    ] = "2000,5000,10000",
    backlog: Annotated[
        int, typer.Option(help="normal-lane backlog for the strict override")
    ] = 100_000,
    cpu_cycles: Annotated[
        int, typer.Option(help="only the CPU figure: isolations per agent (0: the others)")
    ] = 0,
    cpu_agents: Annotated[int, typer.Option(help="agents of the CPU figure")] = 200,
    profile: Annotated[
        Path | None, typer.Option(help="CPU figure under pyinstrument, text report here")
    ] = None,
    spy: Annotated[
        Path | None, typer.Option(help="CPU figure sampled by py-spy, collapsed stacks here")
    ] = None,
    cpu_idle_agents: Annotated[
        int, typer.Option(help="CPU figure: agents more that only long-poll (never commanded)")
    ] = 0,
    cpu_idle_wait: Annotated[float, typer.Option(help="the idle agents' long-poll wait, s")] = 55.0,
) -> None:
    """Print the enforcer's figures as JSON lines."""
    log_dir = Path(tempfile.mkdtemp(prefix="hostiso-measure-"))

    async def run() -> None:
        with Stack() as stack:
            if cpu_cycles:
                figure = await measure_cpu_per_isolation(
                    stack,
                    cpu_agents,
                    cpu_cycles,
                    log_dir,
                    profile=profile,
                    spy=spy,
                    idle=cpu_idle_agents,
                    idle_wait=cpu_idle_wait,
                )
                print(orjson.dumps({"cpu": figure}).decode(), flush=True)
                return
            print(
                orjson.dumps(
                    {"delivery": await measure_delivery(stack, samples, log_dir)}
                ).decode(),
                flush=True,
            )
            for count in (int(n) for n in agents.split(",") if n):
                print(
                    orjson.dumps(
                        {"capacity": await measure_capacity(stack, count, log_dir)}
                    ).decode(),
                    flush=True,
                )
            for size in (0, backlog):
                print(
                    orjson.dumps(
                        {"strict_override": await measure_strict_override(stack, size, log_dir)}
                    ).decode(),
                    flush=True,
                )
        print(f"enforcer logs in {log_dir}", flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    typer.run(main)
