"""Session-scoped real Kafka and Redis; every test gets its own topic prefix and Redis key prefix.

Order of preference: HOSTISO_TEST_KAFKA_BOOTSTRAP / HOSTISO_TEST_REDIS_URL if set (PLAINTEXT,
no auth); testcontainers if HOSTISO_TEST_DOCKER=1 and a Docker engine answers (PLAINTEXT);
otherwise a local broker started from the Maven jars and a local redis-server (the default, no
Docker needed), both **secure**: Kafka with SASL_SSL + SCRAM-SHA-512 and ACLs, Redis with ACL users
(HOSTISO_TEST_SECURE=0 runs them in PLAINTEXT without auth instead). Harness clients connect as
the admin principal, services under test as their own (tests/helpers.py ``SECURITY``).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.infra import LocalKafka, LocalRedis, ensure_kafka_jars
from shared.infra.kafka import KAFKA_IMAGE, KAFKA_VERSION
from shared.infra.proc import free_port
from shared.kafka import ensure_topics
from shared.kafka_acls import provision_acls
from shared.topics import Topics
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


def _docker_available() -> bool:
    if os.environ.get("HOSTISO_TEST_DOCKER") != "1":
        return False
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


def _announce(config: pytest.Config, line: str) -> None:
    """Say in the test log which infrastructure the run uses (shown even with output captured)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n[hostiso] {line}")


@contextlib.contextmanager
def _apache_kafka_container() -> Iterator[str]:
    """The official apache/kafka image, single KRaft node, advertised on a fixed host port.

    testcontainers' KafkaContainer targets Confluent's images, so the official image is run as a
    generic container: the advertised listener must name the host port, hence the fixed binding.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = free_port()
    container = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, port)
        .with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://127.0.0.1:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
        )
    )
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"127.0.0.1:{port}"


def _secure() -> bool:
    return os.environ.get("HOSTISO_TEST_SECURE", "1") != "0"


@pytest.fixture(scope="session")
def kafka_bootstrap(pytestconfig: pytest.Config) -> Iterator[str]:
    if os.environ.get("HOSTISO_TEST_KAFKA_BOOTSTRAP"):
        yield os.environ["HOSTISO_TEST_KAFKA_BOOTSTRAP"]
        return
    if _docker_available():
        with _apache_kafka_container() as bootstrap:
            _announce(pytestconfig, f"Apache Kafka (KRaft) in Docker at {bootstrap}")
            yield bootstrap
        return
    kafka = LocalKafka(secure=_secure())
    started = time.monotonic()
    kafka.start()
    _announce(
        pytestconfig,
        f"Apache Kafka {KAFKA_VERSION} (KRaft, {kafka.security_protocol}) started from the Maven "
        f"jars in {ensure_kafka_jars()} at {kafka.bootstrap} in {time.monotonic() - started:.1f}s",
    )
    if kafka.secure:
        helpers.SECURITY.kafka_bootstrap = kafka.bootstrap
        helpers.SECURITY.kafka_admin = kafka.client_options()
        helpers.SECURITY.kafka_env = kafka.client_env
        helpers.SECURITY.kafka_options_for = kafka.client_options
    try:
        yield kafka.bootstrap
    finally:
        helpers.SECURITY.kafka_admin = {}
        helpers.SECURITY.kafka_env = None
        helpers.SECURITY.kafka_options_for = None
        kafka.stop()


class AclPrefixes:
    """Topic prefixes whose ACLs already exist, handed out one per test.

    Brokers enforce new ACLs about a second after they are created; provisioning a batch of
    prefixes at once pays that second once per batch instead of once per test.
    """

    batch = 48

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._ready: list[str] = []

    async def take(self) -> str:
        if not self._ready:
            prefixes = [f"t{uuid.uuid4().hex[:10]}." for _ in range(self.batch)]
            await provision_acls(
                self._bootstrap,
                [Topics(p) for p in prefixes],
                options=helpers.kafka_admin_options(),
            )
            self._ready = prefixes
        return self._ready.pop()


@pytest.fixture(scope="session")
def acl_prefixes(kafka_bootstrap: str) -> AclPrefixes | None:
    return AclPrefixes(kafka_bootstrap) if helpers.SECURITY.kafka_admin else None


@pytest.fixture(scope="session")
def redis_url(pytestconfig: pytest.Config) -> Iterator[str]:
    if os.environ.get("HOSTISO_TEST_REDIS_URL"):
        yield os.environ["HOSTISO_TEST_REDIS_URL"]
        return
    if _docker_available():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer("redis:7").with_command("redis-server --appendonly yes") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    # Service users are confined to their namespace behind any (per-test random) prefix.
    redis = LocalRedis(secure=_secure(), tls=_secure(), key_prefix="*")
    redis.start()
    auth = "TLS, ACL users, default user off" if redis.secure else "no auth"
    _announce(pytestconfig, f"redis-server (AOF on, {auth}) started on port {redis.port}")
    if redis.secure:
        helpers.SECURITY.redis_admin_url = redis.url
        helpers.SECURITY.redis_url_for = redis.url_for
        helpers.SECURITY.redis_ca_file = redis.ca_file
    try:
        yield redis.url
    finally:
        helpers.SECURITY.redis_url_for = None
        redis.close()


@pytest.fixture
def unique_suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def topic_prefix(unique_suffix: str, acl_prefixes: AclPrefixes | None) -> str:
    """This test's topic prefix; on the secure broker its principals' ACLs already exist."""
    if acl_prefixes is not None:
        return await acl_prefixes.take()
    return f"t{unique_suffix}."


@pytest.fixture
def redis_prefix(unique_suffix: str) -> str:
    return f"t{unique_suffix}:"


@pytest.fixture
async def topics(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[Topics]:
    """This test's own set of topics, created on the real broker."""
    t = Topics(topic_prefix)
    await ensure_topics(kafka_bootstrap, t, options=helpers.kafka_admin_options())
    yield t


@pytest.fixture
def service_env(
    kafka_bootstrap: str, redis_url: str, topic_prefix: str, redis_prefix: str
) -> dict[str, str]:
    """HOSTISO_* variables that point a service at this test's Kafka, Redis and prefixes.

    ``ServiceProcess`` adds the credentials of the service it starts (its own principal).
    """
    return {
        "HOSTISO_DEV": "1",
        "HOSTISO_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HOSTISO_REDIS_URL": redis_url,
        "HOSTISO_TOPIC_PREFIX": topic_prefix,
        "HOSTISO_REDIS_PREFIX": redis_prefix,
    }
