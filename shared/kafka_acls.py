"""Kafka ACLs per service principal: each writes only what DESIGN §2 says it produces.

The table below is the one place that says which principal may write, read and join what. ACLs
are created with CreateAcls (API key 30) through an admin connection, because aiokafka's admin
client has no ``create_acls``; creating an ACL that already exists is a no-op, so provisioning is
idempotent and runs wherever topics are provisioned for a prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest_v1, DescribeAclsRequest
from aiokafka.protocol.api import Request

from shared.topics import GroupName, TopicName, Topics

# Service principals (SCRAM user names); ``platform`` stands for the other platform services
# that send isolation requests. ``admin`` is a super user (tooling, topic and ACL provisioning).
SERVICE_PRINCIPALS = ("settings", "isolation", "enforcer")
PLATFORM_PRINCIPAL = "platform"
ADMIN_PRINCIPAL = "admin"
PRINCIPALS = (*SERVICE_PRINCIPALS, PLATFORM_PRINCIPAL)

_AUDIT_AND_DLQ = (TopicName.AUDIT, TopicName.DLQ)

PRODUCES: Mapping[str, tuple[TopicName, ...]] = {
    "settings": (TopicName.SETTINGS_ALLOWLIST, *_AUDIT_AND_DLQ),
    # isolation's REST API publishes the requests it accepts to its own request topics.
    "isolation": (
        TopicName.ENFORCER_COMMANDS,
        TopicName.ENFORCER_COMMANDS_PRIORITY,
        TopicName.ISOLATION_REQUESTS,
        TopicName.ISOLATION_REQUESTS_PRIORITY,
        TopicName.ISOLATION_EVENTS,
        *_AUDIT_AND_DLQ,
    ),
    "enforcer": (TopicName.ENDPOINTS, TopicName.ISOLATION_STATUS, *_AUDIT_AND_DLQ),
    PLATFORM_PRINCIPAL: (TopicName.ISOLATION_REQUESTS, TopicName.ISOLATION_REQUESTS_PRIORITY),
}

CONSUMES: Mapping[str, tuple[TopicName, ...]] = {
    "settings": (),
    "isolation": (
        TopicName.SETTINGS_ALLOWLIST,
        TopicName.ENDPOINTS,
        TopicName.ISOLATION_REQUESTS,
        TopicName.ISOLATION_REQUESTS_PRIORITY,
        TopicName.ISOLATION_STATUS,
    ),
    "enforcer": (TopicName.ENFORCER_COMMANDS, TopicName.ENFORCER_COMMANDS_PRIORITY),
    PLATFORM_PRINCIPAL: (),
}

# Consumer groups (behind the topic prefix) each principal may join and commit in.
GROUPS: Mapping[str, tuple[GroupName, ...]] = {
    "isolation": (
        GroupName.ISOLATION_REQUESTS,
        GroupName.ISOLATION_REQUESTS_PRIORITY,
        GroupName.ISOLATION_STATUS,
        GroupName.ISOLATION_REVOCATIONS,
    ),
    "enforcer": (GroupName.ENFORCER_COMMANDS, GroupName.ENFORCER_COMMANDS_PRIORITY),
}

# Transactional id prefixes behind the topic prefix (services/settings/adapters/outbox_relay.py
# relay_transactional_id: each outbox shard's fenced transactions, ``settings-relay-<shard>``).
TRANSACTIONAL_IDS: Mapping[str, tuple[str, ...]] = {"settings": ("settings-relay",)}


class _Resource(IntEnum):
    TOPIC = 2
    GROUP = 3
    TRANSACTIONAL_ID = 5


class _Pattern(IntEnum):
    LITERAL = 3
    PREFIXED = 4


class _Operation(IntEnum):
    READ = 3
    WRITE = 4
    DESCRIBE = 8


_ALLOW = 3


@dataclass(frozen=True)
class AclBinding:
    """One ALLOW rule: ``principal`` may ``operation`` on the resource named (or prefixed) so."""

    resource: _Resource
    name: str
    pattern: _Pattern
    principal: str
    operation: _Operation

    def as_creation(self) -> tuple[int, str, int, str, str, int, int]:
        return (
            int(self.resource),
            self.name,
            int(self.pattern),
            f"User:{self.principal}",
            "*",
            int(self.operation),
            _ALLOW,
        )


def acl_bindings(topics: Topics, principals: Iterable[str] = PRINCIPALS) -> list[AclBinding]:
    """Every ALLOW rule for the deployment whose topics carry ``topics.prefix``."""
    bindings: list[AclBinding] = []
    for principal in principals:
        # DESCRIBE on the deployment's topics lets a service see that its topics exist (so its
        # start-up check does not try to create them); it grants no read or write.
        bindings.append(
            AclBinding(
                _Resource.TOPIC, topics.prefix, _Pattern.PREFIXED, principal, _Operation.DESCRIBE
            )
        )
        for name in PRODUCES[principal]:
            bindings.append(
                AclBinding(
                    _Resource.TOPIC, topics(name), _Pattern.LITERAL, principal, _Operation.WRITE
                )
            )
        for name in CONSUMES[principal]:
            bindings.append(
                AclBinding(
                    _Resource.TOPIC, topics(name), _Pattern.LITERAL, principal, _Operation.READ
                )
            )
        for transactional_id in TRANSACTIONAL_IDS.get(principal, ()):
            bindings.append(
                AclBinding(
                    _Resource.TRANSACTIONAL_ID,
                    topics.prefix + transactional_id,
                    _Pattern.PREFIXED,
                    principal,
                    _Operation.WRITE,
                )
            )
        for group in GROUPS.get(principal, ()):
            bindings.append(
                AclBinding(
                    _Resource.GROUP,
                    topics.group(group),
                    _Pattern.LITERAL,
                    principal,
                    _Operation.READ,
                )
            )
    return bindings


class AclProvisioningError(RuntimeError):
    """The broker refused to create an ACL (not a super user, authorizer off, bad binding)."""


class _CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]
    # aiokafka's CreateAclsRequest carries one binding; this one sends them all at once.
    API_KEY = 30

    def __init__(self, bindings: list[AclBinding]) -> None:
        self._bindings = bindings

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class([b.as_creation() for b in self._bindings])


async def provision_acls(
    bootstrap: str,
    topics: Topics | Iterable[Topics],
    *,
    options: Mapping[str, Any],
    principals: Iterable[str] = PRINCIPALS,
    timeout: float = 30.0,
) -> list[AclBinding]:
    """Create the ACLs of every principal for ``topics.prefix`` (or several), as a super user.

    Returns once every broker enforces them, so a client started right after is not refused.
    """
    deployments = [topics] if isinstance(topics, Topics) else list(topics)
    wanted = tuple(principals)
    bindings = [b for t in deployments for b in acl_bindings(t, wanted)]
    admin = AIOKafkaAdminClient(**options, bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        # Any broker forwards CreateAcls to the active controller.
        response = await admin._send_request(_CreateAcls(bindings))
        failures = [
            f"{binding.principal} {binding.operation.name} {binding.name}: {message or code}"
            for binding, (code, message) in zip(bindings, response.creation_responses, strict=True)
            if code != 0
        ]
        if failures:
            raise AclProvisioningError("CreateAcls failed: " + "; ".join(failures))
        await _wait_enforced_everywhere(admin, bindings[-1], timeout)
    finally:
        await admin.close()
    return bindings


async def _wait_enforced_everywhere(admin: Any, last: AclBinding, timeout: float) -> None:
    # The controller answers once the ACLs are committed; each broker applies the metadata log
    # in order a moment later, so the last binding being visible on a broker means all are.
    resource, name, pattern, principal, host, operation, permission = last.as_creation()
    describe = DescribeAclsRequest(resource, name, pattern, principal, host, operation, permission)
    deadline = asyncio.get_running_loop().time() + timeout
    for broker in admin._client.cluster.brokers():
        while True:
            answer = await admin._send_request(describe, broker.nodeId)
            if answer.error_code == 0 and answer.resources:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise AclProvisioningError(
                    f"broker {broker.nodeId} does not enforce the new ACLs after {timeout}s"
                )
            await asyncio.sleep(0.05)
