"""One error format on every service: RFC 9457 problem details (DESIGN §4, shared/problems.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import Query
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict

from shared.http import add_operational_routes, install_request_guards, service_app
from shared.problems import PROBLEM_JSON, ErrorMapping, InputRejectedError, ProblemKind

pytestmark = pytest.mark.unit


class WidgetMissingError(LookupError):
    """A domain error with no HTTP status of its own."""


class WidgetRejectedError(ValueError):
    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field, self.rule, self.message = field, rule, message


class BusyError(Exception):
    def __init__(self) -> None:
        super().__init__("internal: redis://secret-host:6379 refused")
        self.retry_after_s = 7


ERRORS = ErrorMapping(
    {
        WidgetMissingError: ProblemKind(404, "Not found", "No such widget", "widget_id", "exists"),
        WidgetRejectedError: ProblemKind(422, "Invalid input", "Invalid widget"),
        BusyError: ProblemKind(503, "Busy", "the store is busy; retry"),
    },
    fields={"colour": "body.colour", "widget_id": "path.widget_id"},
    everywhere=(BusyError,),
)


class Widget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    colour: str
    size: int


def _app() -> object:
    app = service_app(title="widgets")
    install_request_guards(app, token_policy=None, public_prefixes=["/w"], max_body_bytes=1024)
    add_operational_routes(app, _ready, CollectorRegistry())
    ERRORS.install(app)

    @app.get("/w/{widget_id}", responses=ERRORS.responses(WidgetMissingError))
    async def get_widget(widget_id: str, limit: Annotated[int, Query(ge=1)] = 1) -> Widget:
        if widget_id == "busy":
            raise BusyError()
        if widget_id == "boom":
            raise RuntimeError("secret internals")
        if widget_id == "wide":
            raise InputRejectedError("query.limit", "le", "must be at most 5")
        raise WidgetMissingError(f"widget_id: no widget {widget_id!r}")

    @app.post("/w", status_code=201, responses=ERRORS.responses(WidgetRejectedError))
    async def add_widget(body: Widget) -> Widget:
        raise WidgetRejectedError("colour", "palette", f"{body.colour} is not in the palette")

    @app.get("/secret")
    async def secret() -> dict[str, str]:
        return {}

    return app


async def _ready() -> dict[str, bool]:
    return {"kafka": True, "redis": False}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status
    return body  # type: ignore[no-any-return]


async def test_request_validation_names_dotted_fields_and_pydantic_rules(
    client: httpx.AsyncClient,
) -> None:
    body = _problem(await client.post("/w", json={"colour": 1, "extra": True}), 422)
    errors = {(e["field"], e["rule"]) for e in body["errors"]}  # type: ignore[attr-defined]
    assert errors == {
        ("body.colour", "string_type"),
        ("body.size", "missing"),
        ("body.extra", "extra_forbidden"),
    }
    query = _problem(await client.get("/w/x?limit=0"), 422)
    assert query["errors"][0]["field"] == "query.limit"  # type: ignore[index]


async def test_domain_error_keeps_its_field_and_rule(client: httpx.AsyncClient) -> None:
    body = _problem(await client.post("/w", json={"colour": "mauve", "size": 1}), 422)
    assert body["errors"] == [
        {"field": "body.colour", "rule": "palette", "message": "mauve is not in the palette"}
    ]
    assert body["type"] == "urn:hostiso:problem:colour.palette"


async def test_mapping_default_field_and_rule_apply(client: httpx.AsyncClient) -> None:
    body = _problem(await client.get("/w/w1"), 404)
    assert body["title"] == "Not found"
    assert body["errors"][0]["field"] == "path.widget_id"  # type: ignore[index]
    assert body["errors"][0]["rule"] == "exists"  # type: ignore[index]


async def test_route_input_check_is_a_422_problem(client: httpx.AsyncClient) -> None:
    body = _problem(await client.get("/w/wide"), 422)
    assert body["errors"][0] == {
        "field": "query.limit",
        "rule": "le",
        "message": "must be at most 5",
    }  # type: ignore[index]


async def test_undecodable_body_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/w", content=b"{nope", headers={"content-type": "application/json"}
    )
    body = _problem(response, 400)
    assert body["errors"][0]["rule"] == "json_invalid"  # type: ignore[index]


async def test_body_that_is_not_json_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/w", content=b"colour=red", headers={"content-type": "text/plain"}
    )
    body = _problem(response, 415)
    assert body["errors"][0]["field"] == "header.Content-Type"  # type: ignore[index]


async def test_405_lists_every_method_of_the_path_in_allow(client: httpx.AsyncClient) -> None:
    _problem(response := await client.delete("/w"), 405)
    assert response.headers["allow"] == "POST"
    _problem(response := await client.put("/w/w1"), 405)
    assert response.headers["allow"] == "GET"


async def test_unknown_path_is_a_404_problem(client: httpx.AsyncClient) -> None:
    assert "/nowhere" in str(_problem(await client.get("/nowhere"), 404)["detail"])


async def test_infrastructure_error_is_503_with_retry_after_and_no_internals(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/w/busy")
    body = _problem(response, 503)
    assert response.headers["retry-after"] == "7"
    assert "secret-host" not in response.text and body["detail"] == "the store is busy; retry"


async def test_unexpected_error_is_a_500_problem_without_internals(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/w/boom")
    _problem(response, 500)
    assert "secret internals" not in response.text


async def test_auth_gate_401_names_the_authorization_header(client: httpx.AsyncClient) -> None:
    body = _problem(await client.get("/secret"), 401)
    assert body["errors"][0]["field"] == "header.Authorization"  # type: ignore[index]


async def test_body_over_the_limit_is_413_problem(client: httpx.AsyncClient) -> None:
    body = _problem(await client.post("/w", content=b"x" * 2048), 413)
    assert body["errors"][0]["rule"] == "max_bytes"  # type: ignore[index]


async def test_not_ready_is_a_503_problem_that_keeps_the_checks(client: httpx.AsyncClient) -> None:
    body = _problem(await client.get("/ready"), 503)
    assert body["ready"] is False and body["checks"] == {"kafka": True, "redis": False}
    assert body["errors"][0]["field"] == "checks.redis"  # type: ignore[index]


async def test_swagger_ui_is_served_from_the_package_without_a_cdn(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert (await client.get("/docs/static/swagger-ui-bundle.js")).status_code == 200


async def test_document_lists_mapped_and_shared_statuses(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    get = document["paths"]["/w/{widget_id}"]["get"]
    assert get["operationId"] == "getWidget"
    assert {"200", "404", "422", "503"} <= set(get["responses"])
    post = document["paths"]["/w"]["post"]
    assert {"201", "400", "413", "415", "422", "503"} <= set(post["responses"])
    assert {"401", "403"} <= set(document["paths"]["/secret"]["get"]["responses"])
    assert "401" not in get["responses"]  # public route
