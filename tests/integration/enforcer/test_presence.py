"""last_seen on the real Kafka and Redis: the long poll publishes it, throttled across instances."""

from __future__ import annotations

from collections.abc import Callable

from services.enforcer.config import EnforcerSettings
from shared.messages import EndpointRegistered
from shared.topics import Topics
from tests.helpers import read_topic
from tests.integration.enforcer.conftest import enroll, running_enforcer


async def test_polls_of_two_instances_publish_last_seen_once_per_interval(
    enforcer_settings: Callable[..., EnforcerSettings], kafka_bootstrap: str, topics: Topics
) -> None:
    settings = enforcer_settings(last_seen_interval_s=3600)
    async with (
        running_enforcer(settings) as (_, first),
        running_enforcer(enforcer_settings(last_seen_interval_s=3600, instance_id="b")) as (
            _,
            second,
        ),
    ):
        agent = await enroll(first)
        for http in (first, second, first, second):
            agent.http = http
            assert (await agent.poll()).status_code == 204
        records: list[EndpointRegistered] = await read_topic(
            kafka_bootstrap, topics, topics.endpoints, expect=2, timeout=30
        )
        # Let any late duplicate arrive before counting: the enrollment and one poll, no more.
        again: list[EndpointRegistered] = await read_topic(
            kafka_bootstrap, topics, topics.endpoints, timeout=3
        )
    enrolled, polled = records
    assert len(again) == 2
    assert enrolled.last_seen is None
    assert polled.endpoint_id == enrolled.endpoint_id == agent.agent_id
    assert (polled.account_id, polled.hostname, polled.platform) == ("acct-1", "web-01", "linux")
    assert polled.enrolled_at == enrolled.enrolled_at
    assert polled.last_seen is not None and polled.last_seen >= enrolled.enrolled_at
