"""AsyncAPI description of every topic: a FastStream app that declares who publishes and consumes what.

The services run their own aiokafka loops (``shared.kafka``); this app is never started. It
exists so FastStream turns the message models of ``shared.messages`` and the topic table of
``shared.topics`` into ``docs/asyncapi.json``; ``asyncapi_document`` then adds what FastStream
does not say (each message's Kafka key, each topic's partitions and cleanup policy) and drops
the ``correlation_id`` header FastStream assumes (nothing here sends it). A unit test
regenerates the document to check that it and the code have not drifted apart.
``message_schemas`` gives the JSON Schema of every message of every topic (``docs/schemas/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, get_args

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from shared.config import ServiceSettings
from shared.messages import TOPIC_MESSAGE_TYPES
from shared.topics import TOPIC_SPECS, TopicName, Topics, TopicSpec

DOC_VERSION = "1.0.0"


@dataclass(frozen=True)
class Subscription:
    """A service's consumer of a topic: its consumer group (default prefix) and why it reads it."""

    service: str
    group: str | None
    purpose: str


@dataclass(frozen=True)
class TopicFlow:
    """Who writes a topic and who reads it."""

    topic: TopicName
    summary: str
    publishers: tuple[str, ...]
    subscriptions: tuple[Subscription, ...] = ()


FLOWS: tuple[TopicFlow, ...] = (
    TopicFlow(
        TopicName.SETTINGS_ALLOWLIST,
        "Full state of an account's Tooling Allowlist after every change (strictly increasing "
        "version); the settings service's outbox relay is its only writer.",
        publishers=("settings",),
        subscriptions=(
            Subscription(
                "isolation",
                None,
                "settings replica: reads every partition from the start without a group, so "
                "the snapshot at isolation time sees every acknowledged change",
            ),
            Subscription(
                "isolation",
                "hostiso.isolation-revocations",
                "revocation fan-out: a version that revoked an entry becomes one priority "
                "RevokeEndpointPeer per endpoint whose policy allows it",
            ),
        ),
    ),
    TopicFlow(
        TopicName.ENDPOINTS,
        "Endpoint registry: which account an enrolled endpoint belongs to.",
        publishers=("enforcer",),
        subscriptions=(
            Subscription("isolation", None, "endpoint registry replica: reads the compacted state"),
        ),
    ),
    TopicFlow(
        TopicName.ISOLATION_REQUESTS,
        "Isolate (standard or strict), refresh and release requests. The isolation REST API "
        "writes them here; other platform services may write them directly.",
        publishers=("isolation",),
        subscriptions=(Subscription("isolation", "hostiso.isolation", "normal request lane"),),
    ),
    TopicFlow(
        TopicName.ISOLATION_REQUESTS_PRIORITY,
        "Strict isolation requests (endpoint or account-wide, RMM compromised) and the "
        "per-endpoint revocations of a compromised tool: a lane of its own so they overtake "
        "any backlog of normal requests.",
        publishers=("isolation",),
        subscriptions=(
            Subscription("isolation", "hostiso.isolation-priority", "priority request lane"),
        ),
    ),
    TopicFlow(
        TopicName.ISOLATION_STATUS,
        "What an agent reported for a policy sequence: applied (with the rules' hash) or "
        "failed (with its reason); and the agent's usage counters of its allowlist entries "
        "(deltas per sequence).",
        publishers=("enforcer",),
        subscriptions=(
            Subscription(
                "isolation", "hostiso.isolation-status", "delivery state of each endpoint"
            ),
        ),
    ),
    TopicFlow(
        TopicName.ISOLATION_EVENTS,
        "Every change of an endpoint's isolation state (pending, isolated, failed, released), "
        "as full state keyed by endpoint: other platform services (ticketing, alerting) learn "
        "applied or failed without polling. Compacted; at least once, a repeat is identical.",
        publishers=("isolation",),
    ),
    TopicFlow(
        TopicName.ENFORCER_COMMANDS,
        "Frozen policies to make an endpoint's desired policy (standard isolation, release).",
        publishers=("isolation",),
        subscriptions=(Subscription("enforcer", "hostiso.enforcer-normal", "normal command lane"),),
    ),
    TopicFlow(
        TopicName.ENFORCER_COMMANDS_PRIORITY,
        "Strict policies: a lane of its own so they reach the agent mailbox while the normal "
        "lane holds a backlog (guarantee 5).",
        publishers=("isolation",),
        subscriptions=(
            Subscription("enforcer", "hostiso.enforcer-priority", "priority command lane"),
        ),
    ),
    TopicFlow(
        TopicName.AUDIT,
        "Audit trail: every change and every refused attempt. Read by the platform's audit "
        "store, not by these services.",
        publishers=("settings", "isolation", "enforcer"),
    ),
    TopicFlow(
        TopicName.DLQ,
        "Records a consumer could not accept, with the reason and the source "
        "topic/partition/offset; the consumer carries on past them.",
        publishers=("settings", "isolation", "enforcer"),
    ),
)


def _spec(name: TopicName) -> TopicSpec:
    return next(spec for spec in TOPIC_SPECS if spec.name == name)


def _describe(flow: TopicFlow, role: str) -> str:
    spec = _spec(flow.topic)
    readers = ", ".join(sorted({s.service for s in flow.subscriptions})) or "none in this system"
    return (
        f"{role} {flow.summary} Key: {spec.key}. Partitions: {spec.partitions}. "
        f"Cleanup policy: {spec.cleanup_policy}. Published by: {', '.join(flow.publishers)}. "
        f"Consumed by: {readers}."
    )


def _subscriber_handler(model: Any) -> Any:
    async def handle(message: Any) -> None:
        """Documentation only: the service's consumer in ``shared.kafka`` handles the record."""

    # Set after definition: FastStream reads the payload schema from the resolved annotation.
    handle.__annotations__ = {"message": model, "return": None}
    return handle


class DocumentedKafkaBroker(KafkaBroker):
    """A KafkaBroker that lists its publishers and subscribers in declaration order.

    FastStream keeps them in weak sets, whose order changes from run to run; a fixed order keeps
    the generated document byte-identical, so the checked-in file diffs cleanly.
    """

    declared_publishers: list[Any]
    declared_subscribers: list[Any]

    @property
    def publishers(self) -> list[Any]:
        return list(getattr(self, "declared_publishers", None) or super().publishers)

    @property
    def subscribers(self) -> list[Any]:
        return list(getattr(self, "declared_subscribers", None) or super().subscribers)


def build_broker(topic_prefix: str = "hostiso.") -> DocumentedKafkaBroker:
    """A broker with one publisher per (service, topic) and one subscriber per consumer; never connected."""
    topics = Topics(topic_prefix)
    publishers: list[Any] = []
    subscribers: list[Any] = []
    broker = DocumentedKafkaBroker(
        ServiceSettings.model_fields["kafka_bootstrap"].default,
        description="Apache Kafka (KRaft). Topic names carry the HOSTISO_TOPIC_PREFIX "
        f"(default {topic_prefix!r}); producers use acks=all and idempotence, consumers "
        "commit only after their effects are stored (at-least-once).",
        protocol="kafka",
        protocol_version="4.1",
    )
    for flow in FLOWS:
        model = TOPIC_MESSAGE_TYPES[flow.topic]
        full = topics(flow.topic)
        for service in flow.publishers:
            publishers.append(
                broker.publisher(
                    full,
                    title=f"{service}:publish:{flow.topic.value}",
                    description=_describe(flow, f"The {service} service publishes here."),
                    schema=model,
                )
            )
        for sub in flow.subscriptions:
            group = sub.group.replace("hostiso.", topic_prefix, 1) if sub.group else None
            how = f"group {group}" if group else "no consumer group"
            title = f"{sub.service}:consume:{flow.topic.value}"
            if sub.group and sum(s.service == sub.service for s in flow.subscriptions) > 1:
                # One service reading a topic twice (replica and group): one operation each.
                title += f":{sub.group.removeprefix('hostiso.')}"
            subscriber = broker.subscriber(
                full,
                group_id=group,
                title=title,
                description=_describe(
                    flow, f"The {sub.service} service consumes here ({sub.purpose}; {how})."
                ),
            )
            subscriber(_subscriber_handler(model))
            subscribers.append(subscriber)
    broker.declared_publishers = publishers
    broker.declared_subscribers = subscribers
    return broker


def build_app() -> FastStream:
    """The FastStream app whose ``schema`` ``faststream docs gen`` renders."""
    broker = build_broker()
    spec = AsyncAPI(
        broker,
        title="hostiso events",
        version=DOC_VERSION,
        description="Every Kafka topic of the host isolation control plane (DESIGN.md §2): its "
        "messages, key, cleanup policy, and which service publishes and consumes it. "
        "Generated from shared/messages.py and shared/topics.py; do not edit by hand.",
        schema_version="3.0.0",
    )
    return FastStream(broker, specification=spec)


def _spec_of_address(address: str, topic_prefix: str = "hostiso.") -> TopicSpec:
    return next(spec for spec in TOPIC_SPECS if f"{topic_prefix}{spec.name.value}" == address)


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI document: FastStream's, plus keys, partitions and cleanup policies."""
    document: dict[str, Any] = json.loads(
        json.dumps(build_app().schema.to_specification().to_jsonable())
    )
    messages = document.get("components", {}).get("messages", {})
    for channel in document.get("channels", {}).values():
        spec = _spec_of_address(channel["address"])
        kafka = channel.setdefault("bindings", {}).setdefault("kafka", {})
        kafka["partitions"] = spec.partitions
        kafka["topicConfiguration"] = {"cleanup.policy": [spec.cleanup_policy]}
        for ref in channel.get("messages", {}).values():
            message = messages[ref["$ref"].rsplit("/", 1)[-1]]
            # FastStream assumes a correlation_id header; no producer here sends one.
            message.pop("correlationId", None)
            message["bindings"] = {
                "kafka": {
                    "key": {
                        "type": "string",
                        "description": f"The record key: the message's {spec.key} (UTF-8); "
                        "all records of one key go to one partition, in order.",
                    },
                    "bindingVersion": "0.4.0",
                }
            }
    return document


def asyncapi_yaml() -> str:
    """The same document as YAML (needs PyYAML, a test dependency)."""
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs

    text: str = yaml.safe_dump(asyncapi_document(), sort_keys=False, allow_unicode=True)
    return text


def message_types(topic: TopicName) -> tuple[type[Any], ...]:
    """The message model(s) of a topic: one, or each member of its discriminated union."""
    model = TOPIC_MESSAGE_TYPES[topic]
    if isinstance(model, type):
        return (model,)
    union = get_args(model)[0]  # Annotated[A | B | C, Field(discriminator=...)]
    return tuple(get_args(union))


def message_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """The JSON Schema (2020-12) of every message of every topic, by (topic, type name).

    Validation schemas, as a consumer decodes: an envelope field with a default may be absent.
    Objects stay open (no ``additionalProperties: false``) except the signed policy's parts:
    a consumer ignores fields a newer producer added (DESIGN §9).
    """
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for topic in TopicName:
        for model in message_types(topic):
            schema = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"urn:hostiso:schema:{topic.value}:{model.__name__}",
                **model.model_json_schema(),
            }
            schemas[(topic.value, model.__name__)] = schema
    return schemas


app = build_app()
