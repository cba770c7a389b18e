"""The checked-in AsyncAPI and OpenAPI documents are exactly what the code generates."""

from __future__ import annotations

import json

import pytest
import yaml

from shared.asyncapi import asyncapi_document, asyncapi_yaml, build_broker
from shared.docs import DOCS_DIR, SERVICES, openapi_document
from shared.messages import TOPIC_MESSAGE_TYPES
from shared.topics import TopicName

REGENERATE = "run `python -m shared.docs` and commit docs/"


def test_checked_in_asyncapi_json_is_what_the_code_generates() -> None:
    checked_in = (DOCS_DIR / "asyncapi.json").read_text(encoding="utf-8")
    generated = asyncapi_document()
    assert json.loads(checked_in) == generated, f"docs/asyncapi.json is stale: {REGENERATE}"
    # Byte-identical too, so `faststream docs gen` and `python -m shared.docs` agree.
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
