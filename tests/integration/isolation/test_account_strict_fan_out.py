"""Account-wide strict fans out into per-endpoint priority requests that every instance shares."""

from __future__ import annotations

import re

import httpx
import pytest

from shared.messages import IsolateEndpoint
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.isolation.conftest import SOC, Harness, running_isolation

pytestmark = pytest.mark.integration

ENDPOINTS = [f"ep-fan-{i:02d}" for i in range(40)]


async def priority_requests_handled(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    return sum(
        float(value)
        for value in re.findall(
            r'^hostiso_isolation_requests_total\{lane="priority",outcome="[a-z]+"\} (\S+)$',
            text,
            re.MULTILINE,
        )
    )


async def test_account_strict_spreads_over_instances_and_issues_one_policy_per_endpoint(
    h: Harness, kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> None:
    async with running_isolation(kafka_bootstrap, redis_url, topics, redis_prefix) as (
        second_app,
        second,
    ):
        for endpoint in ENDPOINTS:
            await h.register(endpoint, "acct-fan")
        for endpoint in ENDPOINTS:
            await h.send(
                h.topics.isolation_requests,
                endpoint,
                IsolateEndpoint(endpoint_id=endpoint, mode="standard", requested_by=SOC),
            )
        await h.commands(expect=len(ENDPOINTS))

        async def all_isolated_or_pending() -> bool:
            response = await h.http.get("/v1/accounts/acct-fan/isolations", headers=h.token())
            return response.status_code == 200 and len(response.json()["endpoints"]) == len(
                ENDPOINTS
            )

        await wait_for(all_isolated_or_pending, timeout=30, message="40 endpoints pending")
        response = await h.http.post(
            "/v1/accounts/acct-fan/strict-isolation",
            json={"reason": "RMM compromised", "disable_allowlist": True},
            headers=h.partner("acct-fan"),
        )
        assert response.status_code == 202, response.text
        assert response.json()["endpoints"] == len(ENDPOINTS)
        strict = await h.commands(expect=len(ENDPOINTS), priority=True)
        assert sorted(c.policy.endpoint_id for c in strict) == ENDPOINTS
        assert all(c.policy.mode == "strict" and c.policy.sequence == 2 for c in strict)
        # One account record became one priority request per endpoint, keyed by endpoint...
        requests = await read_topic(
            kafka_bootstrap, topics, topics.isolation_requests_priority, timeout=30
        )
        fanned = [r for r in requests if isinstance(r, IsolateEndpoint)]
        assert sorted(r.endpoint_id for r in fanned) == ENDPOINTS
        # ...so both instances of the group tightened some of them.
        first_share = await priority_requests_handled(h.http)
        second_share = await priority_requests_handled(second)
        assert first_share > 0 and second_share > 0, (first_share, second_share)
        # Whichever instance owned the account record switched the allowlist off, once.
        await wait_for(
            lambda: (
                h.settings_client.disabled + second_app.state.settings_client.disabled
                == ["acct-fan"]
            ),
            message="allowlist disabled",
        )
