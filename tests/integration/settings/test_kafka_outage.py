"""Kafka unreachable: writes are saved and answered 503; Kafka back: every saved change is published."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shared.infra import KafkaCluster, LocalKafka
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import read_topic
from tests.integration.settings.conftest import SOC, SettingsFactory, running_app
from tests.integration.settings.test_outbox_relay import assert_in_order_without_gaps


@pytest.fixture
async def own_kafka() -> AsyncIterator[KafkaCluster]:
    """A broker of this test's own, to stop and restart (never the session broker)."""
    kafka = LocalKafka(heap="256m")
    await asyncio.to_thread(kafka.start)
    try:
        yield kafka
    finally:
        await asyncio.to_thread(kafka.stop)


async def test_kafka_down_gives_clear_503_and_every_saved_change_is_published_on_return(
    make_settings: SettingsFactory, own_kafka: KafkaCluster, topic_prefix: str
) -> None:
    topics = Topics(topic_prefix)
    # The test's own broker is PLAINTEXT (it is stopped and restarted, not secured).
    settings = make_settings(
        kafka_bootstrap=own_kafka.bootstrap,
        kafka_security_protocol="PLAINTEXT",
        kafka_sasl_username=None,
        kafka_sasl_password=None,
        kafka_ssl_cafile=None,
        publish_wait_s=1.5,
    )
    async with running_app(settings) as running:
        # A fresh broker may still be electing partition leaders: the first write may be
        # answered 503, but it is published all the same before the broker goes down.
        first = await running.add("acct-k", "before", "10.7.0.1")
        assert first.status_code in (201, 503), first.text
        await read_topic(
            own_kafka.bootstrap, topics, topics.settings_allowlist, expect=1, timeout=60
        )
        await asyncio.to_thread(own_kafka.stop_node, 0)

        during = [
            await running.add("acct-k", "during 1", "10.7.0.2"),
            await running.client.patch(running.url("acct-k"), json={"enabled": True}, headers=SOC),
            await running.add("acct-k", "during 2", "10.7.0.3"),
        ]
        for expected_version, response in zip([2, 3, 4], during, strict=True):
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["version"] == expected_version
            assert body["detail"] == (
                f"saved as version {expected_version}; will be published when Kafka is "
                "reachable; not yet in force for new isolations"
            )
        stored = (await running.client.get(running.url("acct-k"), headers=SOC)).json()
        assert stored["version"] == 4 and stored["enabled"]

        await asyncio.to_thread(own_kafka.start_node, 0)
        events: list[AllowlistChanged] = await read_topic(
            own_kafka.bootstrap, topics, topics.settings_allowlist, expect=4, timeout=60
        )
        newest = assert_in_order_without_gaps(events)
        assert newest["acct-k"].version == 4
        assert [e.address for e in newest["acct-k"].entries] == ["10.7.0.1", "10.7.0.2", "10.7.0.3"]
        after = await running.add("acct-k", "after", "10.7.0.4")
        assert after.status_code == 201, after.text
