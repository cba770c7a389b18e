"""Services create their topics with the configured partitions and min.insync.replicas."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.config import ServiceSettings
from shared.runtime import Runtime
from shared.topics import TopicName, Topics
from tests.helpers import SECURITY, kafka_admin_options, topic_partitions

pytestmark = pytest.mark.integration


async def test_runtime_creates_topics_with_the_configured_counts_and_min_isr(
    kafka_bootstrap: str, redis_url: str, topic_prefix: str, redis_prefix: str
) -> None:
    # Creating topics is the admin's right (services may not): the runtime connects as admin.
    connection: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        **SECURITY.service_settings("admin", redis_url=redis_url),
    }
    settings = ServiceSettings(
        dev=True,
        **connection,
        topic_prefix=topic_prefix,
        redis_prefix=redis_prefix,
        topic_partitions={"isolation.requests.priority.v1": 7},
        topic_min_insync_replicas=1,
    )
    runtime = Runtime(settings, "settings")
    await runtime.start()
    try:
        topics = Topics(topic_prefix)
        assert len(await topic_partitions(kafka_bootstrap, topics.isolation_requests_priority)) == 7
        # Unlisted topics keep the counts of shared/topics.py.
        assert len(await topic_partitions(kafka_bootstrap, topics(TopicName.DLQ))) == 1
        admin = AIOKafkaAdminClient(**kafka_admin_options(), bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            described = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topics.enforcer_commands)]
            )
        finally:
            await admin.close()
        entries = {
            name: value for resource in described[0].resources for name, value, *_ in resource[4]
        }
        assert entries["min.insync.replicas"] == "1"
    finally:
        await runtime.stop()
