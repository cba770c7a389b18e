"""The checked-in AsyncAPI, OpenAPI and JSON Schema documents are exactly what the code generates."""

from __future__ import annotations

import json
import re
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from shared.asyncapi import (
    asyncapi_document,
    asyncapi_yaml,
    build_broker,
    message_schemas,
    message_types,
)
from shared.messages import TOPIC_MESSAGE_TYPES
from shared.topics import TopicName
from tools.docs import DOCS_DIR, SCHEMAS_DIR, SERVICES, openapi_document

REGENERATE = "run `python -m tools.docs` and commit docs/"


def test_checked_in_asyncapi_json_is_what_the_code_generates() -> None:
    checked_in = (DOCS_DIR / "asyncapi.json").read_text(encoding="utf-8")
    generated = asyncapi_document()
    assert json.loads(checked_in) == generated, f"docs/asyncapi.json is stale: {REGENERATE}"
    assert checked_in == json.dumps(generated, indent=2), REGENERATE


def test_checked_in_asyncapi_yaml_is_what_the_code_generates() -> None:
    checked_in = (DOCS_DIR / "asyncapi.yaml").read_text(encoding="utf-8")
    assert checked_in == asyncapi_yaml(), f"docs/asyncapi.yaml is stale: {REGENERATE}"
    assert yaml.safe_load(checked_in) == asyncapi_document()


def test_every_topic_is_a_channel_with_its_message_schema() -> None:
    document = asyncapi_document()
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {f"hostiso.{name.value}" for name in TopicName}
    schemas = document["components"]["schemas"]
    for model in TOPIC_MESSAGE_TYPES.values():
        if isinstance(model, type):
            assert model.__name__ in schemas


def test_every_channel_names_its_key_cleanup_policy_and_services() -> None:
    for name, channel in asyncapi_document()["channels"].items():
        description = channel["description"]
        assert "Key: " in description, name
        assert "Cleanup policy: " in description, name
        assert "Published by: " in description, name


def test_compacted_topics_say_so() -> None:
    channels = asyncapi_document()["channels"].values()
    compacted = {c["address"] for c in channels if "Cleanup policy: compact" in c["description"]}
    assert compacted == {
        "hostiso.settings.allowlist.v1",
        "hostiso.endpoints.v1",
        "hostiso.isolation.events.v1",
    }


def test_document_generation_is_stable_across_builds() -> None:
    first = [p.specification.name for p in build_broker().publishers]
    second = [p.specification.name for p in build_broker().publishers]
    assert first == second


@pytest.mark.parametrize("service", SERVICES)
def test_checked_in_openapi_is_what_the_app_generates(service: str) -> None:
    checked_in = json.loads((DOCS_DIR / f"openapi-{service}.json").read_text(encoding="utf-8"))
    assert checked_in == openapi_document(service), (
        f"docs/openapi-{service}.json is stale: {REGENERATE}"
    )


def test_checked_in_json_schemas_are_what_the_models_generate() -> None:
    generated = message_schemas()
    root = DOCS_DIR / SCHEMAS_DIR
    checked_in = {
        (path.parent.name, path.stem): json.loads(path.read_text(encoding="utf-8"))
        for path in root.glob("*/*.json")
    }
    assert set(checked_in) == set(generated), f"docs/schemas/ is stale: {REGENERATE}"
    for key, schema in generated.items():
        assert checked_in[key] == schema, f"docs/schemas/{key[0]}/{key[1]}.json: {REGENERATE}"


def test_every_topic_has_a_schema_file_per_message_type() -> None:
    names = {(topic, name) for topic, name in message_schemas()}
    for topic in TopicName:
        for model in message_types(topic):
            assert (topic.value, model.__name__) in names


def _models_of(model: Any, seen: dict[str, type[BaseModel]]) -> None:
    if isinstance(model, type) and issubclass(model, BaseModel):
        if model.__name__ in seen:
            return
        seen[model.__name__] = model
        for info in model.model_fields.values():
            _models_of(info.annotation, seen)
        return
    for arg in get_args(model):
        _models_of(arg, seen)


def test_every_field_of_every_message_has_a_description_and_an_example() -> None:
    seen: dict[str, type[BaseModel]] = {}
    for topic in TopicName:
        for model in message_types(topic):
            _models_of(model, seen)
    assert {"Actor", "AllowlistEntry", "FrozenPolicy", "AllowedPeer"} <= set(seen)
    missing = [
        f"{name}.{field}"
        for name, model in seen.items()
        for field, info in model.model_fields.items()
        if not info.description or not info.examples
    ]
    assert not missing, f"fields without description or examples: {missing}"


def test_every_message_names_its_kafka_key_and_no_correlation_header() -> None:
    document = asyncapi_document()
    messages = document["components"]["messages"]
    assert messages
    for name, message in messages.items():
        assert "correlationId" not in message, name
        assert message["bindings"]["kafka"]["key"]["type"] == "string", name
    for channel in document["channels"].values():
        kafka = channel["bindings"]["kafka"]
        assert kafka["partitions"] >= 1
        assert kafka["topicConfiguration"]["cleanup.policy"][0] in {"compact", "delete"}
        for ref in channel["messages"].values():
            key = messages[ref["$ref"].rsplit("/", 1)[-1]]["bindings"]["kafka"]["key"]
            spec_key = channel["description"].split("Key: ", 1)[1].split(".", 1)[0]
            assert spec_key in key["description"]


@pytest.mark.parametrize("service", SERVICES)
def test_every_error_response_is_a_problem_document(service: str) -> None:
    document = openapi_document(service)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (
                        f"{method} {path} {status}"
                    )


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_documents_the_guards_statuses(service: str) -> None:
    document = openapi_document(service)
    for path, item in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            statuses = set(operation["responses"])
            where = f"{method} {path}"
            if operation.get("parameters") or "requestBody" in operation:
                assert "422" in statuses, where
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= statuses, where
            public = (method, path) in {("post", "/v1/agents/enroll"), ("get", "/v1/signing-key")}
            assert public or {"401", "403"} <= statuses, where
            assert "503" in statuses, where


@pytest.mark.parametrize("service", SERVICES)
def test_operation_ids_are_camel_case_names(service: str) -> None:
    ids = [
        operation["operationId"]
        for item in openapi_document(service)["paths"].values()
        for operation in item.values()
    ]
    assert len(ids) == len(set(ids))
    for operation_id in ids:
        assert re.fullmatch(r"[a-z]+([A-Z][a-z0-9]*)*", operation_id), operation_id


def test_metrics_are_documented_as_text() -> None:
    metrics = openapi_document("settings")["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(metrics["content"]) == ["text/plain"]


def test_signed_policy_answer_is_typed_and_204_documented() -> None:
    responses = openapi_document("enforcer")["paths"]["/v1/agents/{agent_id}/policy"]["get"][
        "responses"
    ]
    schema = responses["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/SignedPolicy"}
    assert "204" in responses
