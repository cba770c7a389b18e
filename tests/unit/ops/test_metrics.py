"""Every service's /metrics carries the operability metrics of issue 7 (scraped in-process)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tools.docs import APP_FACTORIES

# Metric family names as the text exposition declares them (counters without ``_total``).
COMMON = {
    "hostiso_http_requests": "requests by route template, method and status",
    "hostiso_http_request_seconds": "request durations",
    "hostiso_consumer_lag": "consumer lag per lane",
    "hostiso_consumer_records": "records handled per consumer lane",
    "hostiso_kafka_records_published": "records acknowledged per topic",
    "hostiso_dlq_records": "DLQ count",
    "hostiso_consumer_retries": "retries by consumer and kind (transient, error, commit)",
    "hostiso_consumer_dead_letters": "dead letters per consumer loop",
    "hostiso_task_restarts": "supervisor restarts per task",
    "hostiso_task_running": "supervised tasks running",
}
PER_SERVICE = {
    "settings": {
        "hostiso_settings_outbox_depth": "outbox depth",
        "hostiso_settings_events_published": "allowlist events published",
    },
    "isolation": {
        "hostiso_isolation_requests": "requests by lane and outcome",
        "hostiso_isolation_status_reports": "agent reports by effect",
    },
    "enforcer": {
        "hostiso_enforcer_policies_stored": "commands stored by lane",
        "hostiso_enforcer_endpoints_by_delivery_state": "policies pending/applied/failed",
    },
}


async def _scrape(service: str) -> tuple[set[str], str]:
    app = APP_FACTORIES[service]()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/no-such-route")).status_code == 404
        response = await client.get("/metrics")
    assert response.status_code == 200
    names = {family.name for family in text_string_to_metric_families(response.text)}
    return names, response.text


@pytest.mark.parametrize("service", sorted(PER_SERVICE))
async def test_metrics_endpoint_exposes_the_operability_metrics(service: str) -> None:
    names, _ = await _scrape(service)
    expected = {**COMMON, **PER_SERVICE[service]}
    missing = {name: what for name, what in expected.items() if name not in names}
    assert not missing, f"{service} /metrics lacks {missing}"


@pytest.mark.parametrize("service", sorted(PER_SERVICE))
async def test_requests_are_counted_by_route_template_and_status(service: str) -> None:
    _, text = await _scrape(service)
    assert 'hostiso_http_requests_total{method="GET",route="/health",status="200"} 1.0' in text
    # Unknown paths share one label instead of one series per path.
    assert 'route="<unmatched>",status="404"' in text
    assert "no-such-route" not in text
