"""Kafka and Redis trust nobody by default: each service is its own principal with least rights.

Finding (issue 10, item 7): on PLAINTEXT Kafka without ACLs anyone who reaches the broker could
write ``enforcer.commands.*`` (the enforcer signs whatever arrives there) or forge
``isolation.requests.*`` with any ``requested_by``; Redis had no authentication. These tests run
against the suite's secure broker and Redis (tests/conftest.py) and fail on the old setup.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.kafka import TopicProvisioningError, ensure_topics, kafka_security_options
from shared.kafka_acls import ADMIN_PRINCIPAL, acl_bindings
from shared.redis import redis_tls_options
from shared.topics import TOPIC_SPECS, Topics
from tests.helpers import SECURITY


@pytest.fixture
def secure_kafka(kafka_bootstrap: str) -> str:
    if SECURITY.kafka_options_for is None:
        pytest.skip("the suite's broker is not the secure local one (HOSTISO_TEST_SECURE=0?)")
    return kafka_bootstrap


@pytest.fixture
def secure_redis(redis_url: str) -> str:
    if SECURITY.redis_url_for is None:
        pytest.skip("the suite's Redis is not the secure local one (HOSTISO_TEST_SECURE=0?)")
    return redis_url


def _tls(url: str) -> dict[str, Any]:
    return redis_tls_options(url, SECURITY.redis_ca_file)


def _as(principal: str) -> dict[str, Any]:
    assert SECURITY.kafka_options_for is not None
    return SECURITY.kafka_options_for(principal)


@pytest.fixture
async def producer_as(secure_kafka: str) -> AsyncIterator[Any]:
    started: list[AIOKafkaProducer] = []

    async def make(principal: str) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **_as(principal),
            bootstrap_servers=secure_kafka,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=10_000,
        )
        await producer.start()
        started.append(producer)
        return producer

    yield make
    for producer in started:
        await producer.stop()


async def test_settings_principal_cannot_produce_to_enforcer_commands(
    producer_as: Any, topics: Topics
) -> None:
    settings = await producer_as("settings")
    with pytest.raises(TopicAuthorizationFailedError):
        await settings.send_and_wait(topics.enforcer_commands, b"forged", key=b"ep-1")


async def test_only_isolation_can_produce_to_enforcer_commands(
    producer_as: Any, topics: Topics
) -> None:
    isolation = await producer_as("isolation")
    for topic in (topics.enforcer_commands, topics.enforcer_commands_priority):
        metadata = await isolation.send_and_wait(topic, b"{}", key=b"ep-1")
        assert metadata.offset >= 0
    for principal in ("enforcer", "platform"):
        other = await producer_as(principal)
        with pytest.raises(TopicAuthorizationFailedError):
            await other.send_and_wait(topics.enforcer_commands_priority, b"forged", key=b"ep-1")


async def test_only_platform_and_isolation_can_produce_isolation_requests(
    producer_as: Any, topics: Topics
) -> None:
    for principal in ("platform", "isolation"):
        allowed = await producer_as(principal)
        for topic in (topics.isolation_requests, topics.isolation_requests_priority):
            assert (await allowed.send_and_wait(topic, b"{}", key=b"ep-1")).offset >= 0
    for principal in ("settings", "enforcer"):
        refused = await producer_as(principal)
        with pytest.raises(TopicAuthorizationFailedError):
            await refused.send_and_wait(topics.isolation_requests, b"forged", key=b"ep-1")


async def test_each_service_writes_only_its_own_topics(producer_as: Any, topics: Topics) -> None:
    # settings.allowlist.v1 is settings' alone; endpoints.v1 and isolation.status.v1 the enforcer's.
    owners = {
        topics.settings_allowlist: "settings",
        topics.endpoints: "enforcer",
        topics.isolation_status: "enforcer",
    }
    for topic, owner in owners.items():
        for principal in ("settings", "isolation", "enforcer", "platform"):
            producer = await producer_as(principal)
            if principal == owner:
                assert (await producer.send_and_wait(topic, b"{}", key=b"k")).offset >= 0
            else:
                with pytest.raises(TopicAuthorizationFailedError):
                    await producer.send_and_wait(topic, b"forged", key=b"k")
    for principal in ("settings", "isolation", "enforcer"):
        producer = await producer_as(principal)
        for topic in (topics.audit, topics.dlq):
            assert (await producer.send_and_wait(topic, b"{}", key=b"k")).offset >= 0


async def test_a_service_cannot_read_a_topic_it_does_not_consume(
    secure_kafka: str, topics: Topics
) -> None:
    # The enforcer consumes only enforcer.commands.*: the allowlists are not its to read.
    consumer = AIOKafkaConsumer(
        **_as("enforcer"), bootstrap_servers=secure_kafka, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topics.settings_allowlist, 0)
        consumer.assign([tp])
        with pytest.raises(TopicAuthorizationFailedError):
            await consumer.seek_to_beginning(tp)
            await consumer.getmany(tp, timeout_ms=5000)
    finally:
        await consumer.stop()


async def test_a_service_cannot_join_another_services_consumer_group(
    secure_kafka: str, topics: Topics
) -> None:
    # Joining the enforcer's group would steal its partitions (commands never signed).
    consumer = AIOKafkaConsumer(
        topics.enforcer_commands,
        **_as("isolation"),
        bootstrap_servers=secure_kafka,
        group_id=f"{topics.prefix}enforcer-normal",
        enable_auto_commit=False,
    )
    try:
        with pytest.raises(GroupAuthorizationFailedError):
            await asyncio.wait_for(consumer.start(), timeout=20)
            await asyncio.wait_for(consumer.getmany(timeout_ms=5000), timeout=20)
    finally:
        await consumer.stop()


async def _cannot_start(options: dict[str, Any], bootstrap: str) -> BaseException:
    producer = AIOKafkaProducer(**options, bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(producer.start(), timeout=20)
    except (KafkaError, OSError, ssl.SSLError, TimeoutError) as exc:
        return exc
    finally:
        await producer.stop()
    raise AssertionError("the client connected")


async def test_a_wrong_password_cannot_connect(secure_kafka: str) -> None:
    options = dict(_as("isolation"), sasl_plain_password="not-the-password")
    error = await _cannot_start(options, secure_kafka)
    assert isinstance(error, KafkaError | KafkaConnectionError)


async def test_a_plaintext_client_cannot_talk_to_the_sasl_ssl_listener(secure_kafka: str) -> None:
    await _cannot_start({}, secure_kafka)


async def test_tls_without_sasl_cannot_connect(secure_kafka: str) -> None:
    # Encrypted but anonymous: the listener requires SCRAM, so there is no unauthenticated way in.
    cafile = _as("admin")["ssl_context"]
    await _cannot_start({"security_protocol": "SSL", "ssl_context": cafile}, secure_kafka)


async def test_a_client_verifies_the_broker_certificate(secure_kafka: str) -> None:
    # A client with the system CAs only must refuse the broker's (locally signed) certificate.
    options = kafka_security_options(
        "SASL_SSL", username="isolation", password=_as("isolation")["sasl_plain_password"]
    )
    options["ssl_context"] = ssl.create_default_context()
    await _cannot_start(options, secure_kafka)


async def test_redis_refuses_a_connection_without_credentials(secure_redis: str) -> None:
    scheme = secure_redis.split("://")[0]
    anonymous = secure_redis.replace(secure_redis.split("@")[0] + "@", f"{scheme}://")
    client = Redis.from_url(anonymous, **_tls(anonymous))
    try:
        with pytest.raises((AuthenticationError, ResponseError)):
            await client.set("anything", "1")
    finally:
        await client.aclose()
    wrong_url = anonymous.replace("://", "://isolation:wrong@", 1)
    wrong = Redis.from_url(wrong_url, **_tls(wrong_url))
    try:
        with pytest.raises(AuthenticationError):
            await wrong.ping()
    finally:
        await wrong.aclose()


@pytest.mark.parametrize("service", ["settings", "isolation", "enforcer"])
async def test_a_redis_service_user_cannot_flush_or_reconfigure(
    secure_redis: str, redis_prefix: str, service: str
) -> None:
    assert SECURITY.redis_url_for is not None
    url = SECURITY.redis_url_for(service)
    client = Redis.from_url(url, **_tls(url))
    try:
        own = f"{redis_prefix}{service}:probe"
        assert await client.set(own, "1")
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "appendonly", "no")):
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
        for command in (("KEYS", "*"), ("ACL", "LIST"), ("SHUTDOWN",)):
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
        # Another service's keys are out of reach.
        other = "enforcer" if service != "enforcer" else "settings"
        with pytest.raises(NoPermissionError):
            await client.get(f"{redis_prefix}{other}:anything")
        assert await client.delete(own) == 1
    finally:
        await client.aclose()


async def test_the_topics_command_provisions_topics_and_acls_for_a_prefix(
    secure_kafka: str, unique_suffix: str
) -> None:
    # What docker compose and a real deployment run, as admin, for a prefix nobody set up yet.
    assert SECURITY.kafka_env is not None
    prefix = f"cli{unique_suffix}."
    env = {
        **os.environ,
        **SECURITY.kafka_env(ADMIN_PRINCIPAL),
        "HOSTISO_TOPIC_PREFIX": prefix,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.infra",
        "topics",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, output.decode()
    topics = Topics(prefix)
    assert f"created {len(TOPIC_SPECS)} topics".encode() in output
    assert f"; {len(acl_bindings(topics))} ACLs".encode() in output
    settings = AIOKafkaProducer(**_as("settings"), bootstrap_servers=secure_kafka)
    await settings.start()
    try:
        assert (
            await settings.send_and_wait(topics.settings_allowlist, b"{}", key=b"a")
        ).offset >= 0
        with pytest.raises(TopicAuthorizationFailedError):
            await settings.send_and_wait(topics.enforcer_commands, b"forged", key=b"ep")
    finally:
        await settings.stop()


async def test_the_topics_command_names_the_missing_sasl_credentials() -> None:
    env = {**os.environ, "HOSTISO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}
    env.pop("HOSTISO_KAFKA_SASL_USERNAME", None)
    env.pop("HOSTISO_KAFKA_SASL_PASSWORD", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.infra",
        "topics",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode != 0
    assert b"HOSTISO_KAFKA_SASL_USERNAME" in output


async def test_redis_speaks_only_tls_and_the_client_verifies_its_certificate(
    secure_redis: str,
) -> None:
    if not secure_redis.startswith("rediss://"):
        pytest.skip("the suite's Redis runs without TLS")
    plain = Redis.from_url(secure_redis.replace("rediss://", "redis://", 1))
    try:
        with pytest.raises(RedisConnectionError):
            await plain.ping()
    finally:
        await plain.aclose()
    # Without our CA (system CAs only) the server's certificate is refused.
    unverified = Redis.from_url(secure_redis, **redis_tls_options(secure_redis, None))
    try:
        with pytest.raises(RedisConnectionError):
            await unverified.ping()
    finally:
        await unverified.aclose()


async def test_a_service_may_not_create_topics_and_is_told_so_at_once(
    secure_kafka: str, topic_prefix: str
) -> None:
    # Topics are the admin's to provision; a service's start-up check fails fast and says why.
    started = asyncio.get_running_loop().time()
    with pytest.raises(TopicProvisioningError, match=r"python -m shared\.infra topics"):
        await ensure_topics(secure_kafka, Topics(topic_prefix), options=_as("settings"))
    assert asyncio.get_running_loop().time() - started < 20
