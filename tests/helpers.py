"""Test helpers: waiting on a condition with a deadline, reading topics from the start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.messages import decode
from shared.topics import Topics

T = TypeVar("T")


@dataclass
class TestSecurity:
    """How the harness and the services under test authenticate to this run's Kafka and Redis.

    Set by the session fixtures of tests/conftest.py. The harness (topic readers, producers of
    test input) connects as the ``admin`` super user; a service connects as its own principal
    (``service_settings`` for an app built in-process, ``ServiceProcess`` for a process), so
    the broker's ACLs and Redis' ACL users are exercised by every integration and e2e test.
    """

    __test__ = False  # not a test class, despite the name

    kafka_bootstrap: str = ""
    kafka_admin: dict[str, Any] = field(default_factory=dict)
    kafka_env: Callable[[str], dict[str, str]] | None = None
    kafka_options_for: Callable[[str], dict[str, Any]] | None = None
    redis_admin_url: str = ""
    redis_url_for: Callable[[str], str] | None = None
    redis_ca_file: str | None = None

    def service_env(self, principal: str, env: dict[str, str]) -> dict[str, str]:
        """HOSTISO_* of ``principal`` for a process whose ``env`` points at this run's infra."""
        out: dict[str, str] = {}
        if (
            self.kafka_env is not None
            and env.get("HOSTISO_KAFKA_BOOTSTRAP") == self.kafka_bootstrap
            and "HOSTISO_KAFKA_SASL_USERNAME" not in env
        ):
            out |= self.kafka_env(principal)
        if self.redis_url_for is not None and env.get("HOSTISO_REDIS_URL") == self.redis_admin_url:
            out["HOSTISO_REDIS_URL"] = self.redis_url_for(principal)
            if self.redis_ca_file is not None:
                out["HOSTISO_REDIS_CA_FILE"] = self.redis_ca_file
        return out

    def service_settings(self, principal: str, *, redis_url: str | None = None) -> dict[str, Any]:
        """Settings fields that make an in-process service connect as ``principal``.

        ``redis_url``: the URL the test would use; replaced only if it is this run's Redis.
        """
        env = self.service_env(
            principal,
            {
                "HOSTISO_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "HOSTISO_REDIS_URL": redis_url or self.redis_admin_url,
            },
        )
        return {key.removeprefix("HOSTISO_").lower(): value for key, value in env.items()}


SECURITY = TestSecurity()


def kafka_admin_options(bootstrap: str | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments for a harness client (the admin principal, or nothing).

    With ``bootstrap``: nothing unless it is the session's secure broker (a test's own broker is
    PLAINTEXT).
    """
    if bootstrap is not None and bootstrap != SECURITY.kafka_bootstrap:
        return {}
    return dict(SECURITY.kafka_admin)


async def wait_for(
    condition: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(**kafka_admin_options(bootstrap), bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(p["partition"] for p in described[0]["partitions"])


async def read_topic(
    bootstrap: str,
    topics: Topics,
    topic: str,
    *,
    expect: int | None = None,
    timeout: float = 20.0,
    isolation_level: str = "read_committed",
) -> list[Any]:
    """Every message on ``topic`` from the start, decoded; waits until ``expect`` are there.

    Read as the services read (read_committed): records of aborted transactions are not there.
    """
    consumer = AIOKafkaConsumer(
        **kafka_admin_options(bootstrap),
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        parts = await topic_partitions(bootstrap, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        name = topics.unprefixed(topic)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend(decode(name, r.value) for r in recs)
            positions = {tp: await consumer.position(tp) for tp in tps}
            caught_up = all(positions[tp] >= end[tp] for tp in tps)
            if expect is None and caught_up:
                return out
            if expect is not None and len(out) >= expect:
                return out
            if expect is not None and caught_up:
                end = await consumer.end_offsets(tps)
        if expect is not None:
            raise AssertionError(f"expected {expect} messages on {topic}, got {len(out)}")
        return out
    finally:
        await consumer.stop()


class ServiceProcess:
    """A service run as a real process (``python -m services.<name>``), for e2e and crash tests."""

    def __init__(
        self, module: str, env: dict[str, str], port: int, log_path: Any, host: str = "127.0.0.1"
    ) -> None:
        self.module = module
        self.env = env
        self.port = port
        self.log_path = log_path
        self.host = host
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        import os
        import sys

        from shared.infra.proc import spawn

        # A service process connects as its own principal (services.<name> → <name>).
        principal = self.module.split(".")[1] if self.module.startswith("services.") else ""
        own = SECURITY.service_env(principal, self.env) if principal else {}
        env = dict(
            os.environ,
            **{**self.env, **own},
            HOSTISO_HTTP_PORT=str(self.port),
            HOSTISO_HTTP_HOST=self.host,
        )
        self.proc = spawn([sys.executable, "-m", self.module], log_path=self.log_path, env=env)
        return self

    async def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        async with httpx.AsyncClient() as client:

            async def ready() -> bool:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.module} exited with {self.proc.returncode}:\n"
                        + self.log_path.read_text(errors="replace")[-4000:]
                    )
                try:
                    return (await client.get(f"{self.url}/ready", timeout=2)).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(ready, timeout=timeout, interval=0.2, message=f"{self.module} /ready")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        from shared.infra.proc import stop

        stop(self.proc, kill=True)

    def stop(self) -> None:
        from shared.infra.proc import stop

        stop(self.proc)
