"""Message contracts (DESIGN.md §2, §5): frozen pydantic v2 models, one per message type.

Every message carries a unique ``id``, its ``type``, the time it happened (``occurred_at``)
and a ``schema_version``. Decoding goes through one discriminated union per topic, so an
unknown ``type`` or a wrong field is a validation error that the consumer sends to the DLQ.
"""

from __future__ import annotations

import ipaddress
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from shared.addresses import AddressRuleError, parse_address_or_prefix
from shared.topics import TopicName

SCHEMA_VERSION: Literal[1] = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


Role = Literal["partner", "soc", "service"]
IsolationMode = Literal["standard", "strict"]
PolicyMode = Literal["standard", "strict", "none"]
IsolationState = Literal[
    "not_isolated", "isolation_pending", "isolated", "release_pending", "failed"
]


class Contract(BaseModel):
    """Base of every Kafka message part: immutable; unknown fields are ignored (DESIGN §9).

    A consumer decodes what a newer producer of the same schema version wrote: fields it does
    not know are dropped, so a producer can add an optional field without breaking older
    consumers. A change older consumers must not ignore is a new schema version.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")


class SignedContract(BaseModel):
    """Base of the signed policy's parts: unknown fields are refused, never ignored.

    The signature covers the canonical bytes of the whole policy: an agent that dropped a field
    it does not know would verify different bytes (and refuse), or, worse, apply a policy
    without a restriction that a newer field carries. So a policy is understood whole or not
    at all (fail closed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(Contract):
    """Envelope fields every message carries."""

    id: str = Field(default_factory=new_id, description="Unique message id (UUID).")
    occurred_at: datetime = Field(default_factory=utcnow, description="When it happened (UTC).")
    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Schema version of the type.")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Actor(Contract):
    """Who did something: the JWT subject and role, and the partner's account."""

    sub: str = Field(min_length=1, max_length=256, examples=["alice@msp.example"])
    role: Role
    account_id: str | None = None


PeerProtocol = Literal["tcp", "udp", "any"]
"""Transport an allowlist entry / policy peer opens: ``any`` is every protocol (DESIGN §7)."""

# Ports travel as a tuple; each is an inet service number (DESIGN §7: 0 to 16 distinct, 1 to 65535).
Port = Annotated[int, Field(ge=1, le=65535)]
MAX_PORTS_PER_ENTRY = 16

_PORTS_DESCRIPTION = "Destination ports (0–16 distinct, 1–65535); empty means every port."
_PROTOCOL_DESCRIPTION = 'Transport: "tcp", "udp" or "any" (ports need "tcp" or "udp").'
_EXPIRES_DESCRIPTION = "When the entry stops allowing traffic (RFC 3339, UTC); null: never."


def peer_key(
    address: str, ports: tuple[int, ...] | list[int], protocol: str
) -> tuple[str, tuple[int, ...], str]:
    """The identity of an allowed peer: address (canonical form), sorted ports, protocol.

    Matches an allowlist entry with a policy peer (revoke, refresh diffs, usage counters):
    ``203.0.113.10/32`` and ``203.0.113.10`` name the same peer, as do two spellings of one
    IPv6 address, and port order does not matter.
    """
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        canonical = address
    else:
        if network.prefixlen == network.max_prefixlen:
            canonical = str(network.network_address)
        else:
            canonical = str(network)
    return canonical, tuple(sorted(ports)), protocol


class AllowlistEntry(Contract):
    """One Tooling Allowlist entry: a display name, a static address or narrow prefix, optional
    ports and protocol, and an optional expiry (DESIGN §4, §7)."""

    id: str = Field(description="Entry id (UUID).")
    name: str = Field(min_length=1, max_length=64, examples=["ConnectWise Automate"])
    address: str = Field(
        description=(
            "Static unicast IPv4/IPv6 address or narrow prefix, canonical form "
            "(RFC 5952 for IPv6; a /32 or /128 is the plain address)."
        ),
        examples=["203.0.113.10", "198.51.100.0/24", "2001:db8::10", "2001:db8:1::/64"],
    )
    ports: tuple[Port, ...] = Field((), description=_PORTS_DESCRIPTION, examples=[[8041, 443]])
    protocol: PeerProtocol = Field("any", description=_PROTOCOL_DESCRIPTION, examples=["tcp"])
    expires_at: AwareDatetime | None = Field(
        None, description=_EXPIRES_DESCRIPTION, examples=["2026-12-31T00:00:00Z"]
    )
    created_at: datetime
    created_by: str


def _renderable_peer(value: str) -> str:
    # Checked, never rewritten: the signature covers the text as issued. The syntax is wider
    # than today's allowlist (IPv6, narrow prefixes) so later policy formats decode; the
    # agent's renderers handle every form accepted here (a zone id or a non-unicast address
    # would fail the whole `nft -f`, so it is refused with the policy).
    try:
        parse_address_or_prefix(value)
    except AddressRuleError as exc:
        raise ValueError(f"{exc.value!r} {exc.message} (rule: {exc.rule})") from exc
    return value


class AllowedPeer(SignedContract):
    """A peer an isolated endpoint may open outbound connections to.

    ``ports``/``protocol``/``expires_at`` are policy v2: a peer that holds their defaults is
    signed exactly as a v1 peer ``{name, address}`` (see ``canonical_policy_bytes``).
    """

    name: str
    address: str
    ports: tuple[Port, ...] = Field((), description=_PORTS_DESCRIPTION, examples=[[8041]])
    protocol: PeerProtocol = Field("any", description=_PROTOCOL_DESCRIPTION, examples=["tcp"])
    expires_at: AwareDatetime | None = Field(
        None, description=_EXPIRES_DESCRIPTION, examples=["2026-12-31T00:00:00Z"]
    )

    _address_renderable = field_validator("address")(_renderable_peer)

    @field_validator("ports")
    @classmethod
    def _ports_distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        # Checked, never rewritten (the signature covers the order as issued).
        if len(set(value)) != len(value):
            raise ValueError("ports must be distinct (rule: ports_distinct)")
        if len(value) > MAX_PORTS_PER_ENTRY:
            raise ValueError(f"at most {MAX_PORTS_PER_ENTRY} ports per peer (rule: ports_too_many)")
        return value

    @model_validator(mode="after")
    def _ports_need_a_transport(self) -> AllowedPeer:
        if self.ports and self.protocol == "any":
            raise ValueError('ports need protocol "tcp" or "udp" (rule: ports_need_protocol)')
        return self


# Policy v2 fields of a peer and their defaults: left out of the signed bytes when default.
_PEER_V2_DEFAULTS: dict[str, Any] = {"ports": [], "protocol": "any", "expires_at": None}


# --- settings.allowlist.v1 (compacted, key = account_id) -------------------------------


class EntryRevoked(Contract):
    """An entry revoked in this version ("this tool is compromised"): cut it everywhere."""

    revocation_id: str = Field(
        description="Idempotency key of the revocation; per-endpoint requests derive from it."
    )
    entry: AllowlistEntry = Field(description="The entry as it was when revoked.")
    reason: str = Field("", max_length=1000, examples=["RMM server compromised"])


class AllowlistChanged(Message):
    """Full state of an account's Tooling Allowlist after a change, at a strictly higher version."""

    type: Literal["AllowlistChanged"] = "AllowlistChanged"
    account_id: str = Field(min_length=1, max_length=128)
    enabled: bool
    entries: tuple[AllowlistEntry, ...] = ()
    version: int = Field(ge=1, description="Settings version, strictly increasing per account.")
    updated_at: datetime
    changed_by: Actor
    revoked: tuple[EntryRevoked, ...] = Field(
        (),
        description="Entries this version revoked (removed, and to be cut from every isolated "
        "endpoint of the account that allows them, on the priority lanes).",
    )


# --- endpoints.v1 (compacted, key = endpoint_id) ---------------------------------------


class EndpointRegistered(Message):
    """An endpoint (agent) enrolled: which account it belongs to."""

    type: Literal["EndpointRegistered"] = "EndpointRegistered"
    endpoint_id: str = Field(min_length=1, max_length=128)
    account_id: str = Field(min_length=1, max_length=128)
    hostname: str = Field(min_length=1, max_length=255)
    platform: Literal["linux", "windows", "macos"]
    enrolled_at: datetime


# --- isolation.requests.v1 / isolation.requests.priority.v1 (key = endpoint_id) --------


class IsolateEndpoint(Message):
    """Command: isolate an endpoint, standard (frozen allowlist) or strict (platform only)."""

    type: Literal["IsolateEndpoint"] = "IsolateEndpoint"
    request_id: str = Field(default_factory=new_id, description="Idempotency key.")
    endpoint_id: str = Field(min_length=1, max_length=128)
    mode: IsolationMode
    reason: str = Field("", max_length=1000)
    requested_by: Actor


class ReleaseEndpoint(Message):
    """Command: release an isolated endpoint (policy mode ``none``)."""

    type: Literal["ReleaseEndpoint"] = "ReleaseEndpoint"
    request_id: str = Field(default_factory=new_id)
    endpoint_id: str = Field(min_length=1, max_length=128)
    reason: str = Field("", max_length=1000)
    requested_by: Actor


class StrictIsolateAccount(Message):
    """Command: strictly isolate every isolated or pending endpoint of an account (RMM compromised)."""

    type: Literal["StrictIsolateAccount"] = "StrictIsolateAccount"
    request_id: str = Field(default_factory=new_id)
    account_id: str = Field(min_length=1, max_length=128)
    reason: str = Field("", max_length=1000)
    disable_allowlist: bool = True
    requested_by: Actor


class RevokeEndpointPeer(Message):
    """Command: issue the endpoint its policy without the revoked entry (same mode, next sequence).

    One per affected endpoint, fanned out from an ``AllowlistChanged`` that revoked the entry,
    on the priority lane; ``request_id`` is ``<revocation_id>:<endpoint_id>``.
    """

    type: Literal["RevokeEndpointPeer"] = "RevokeEndpointPeer"
    request_id: str
    endpoint_id: str = Field(min_length=1, max_length=128)
    account_id: str = Field(min_length=1, max_length=128, description="The entry's account.")
    revocation_id: str
    entry: AllowlistEntry = Field(description="The revoked entry.")
    settings_version: int = Field(ge=1, description="The settings version that revoked it.")
    reason: str = Field("", max_length=1000)
    requested_by: Actor


class RefreshIsolation(Message):
    """Command: a standard isolation takes a new snapshot of the current allowlist, no release."""

    type: Literal["RefreshIsolation"] = "RefreshIsolation"
    request_id: str = Field(default_factory=new_id)
    endpoint_id: str = Field(min_length=1, max_length=128)
    reason: str = Field("", max_length=1000)
    requested_by: Actor


IsolationRequest = Annotated[
    IsolateEndpoint
    | ReleaseEndpoint
    | StrictIsolateAccount
    | RevokeEndpointPeer
    | RefreshIsolation,
    Field(discriminator="type"),
]


# --- frozen policy (DESIGN.md §5) ------------------------------------------------------


class FrozenPolicy(SignedContract):
    """An endpoint's isolation policy, frozen at isolation time; ``mode: none`` is a release."""

    policy_id: str
    endpoint_id: str
    account_id: str
    sequence: int = Field(ge=1, description="Strictly increasing per endpoint.")
    mode: PolicyMode
    allowed_outbound: tuple[AllowedPeer, ...] = ()
    platform: tuple[str, ...] = ()
    settings_version: int = Field(ge=0, description="Settings version the snapshot came from.")
    issued_at: datetime
    issued_by: str
    reason: str = ""

    @field_validator("platform")
    @classmethod
    def _platform_renderable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            _renderable_peer(item)
        return value


class SignedPolicy(SignedContract):
    """A frozen policy and its Ed25519 signature over ``canonical_policy_bytes(policy)``."""

    policy: FrozenPolicy
    signature: str = Field(description="Base64 Ed25519 signature.")
    key_id: str


def canonical_policy_bytes(policy: FrozenPolicy) -> bytes:
    """The bytes that are signed: JSON with sorted keys and no whitespace.

    A peer's policy v2 fields (``ports``, ``protocol``, ``expires_at``) are left out while they
    hold their defaults, so a v1 policy (peers ``{name, address}``) signed before they existed
    still verifies when a newer agent decodes and re-dumps it; when set, they are signed.
    """
    import orjson

    document = policy.model_dump(mode="json")
    document["allowed_outbound"] = [
        {k: v for k, v in peer.items() if k not in _PEER_V2_DEFAULTS or v != _PEER_V2_DEFAULTS[k]}
        for peer in document["allowed_outbound"]
    ]
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


# --- enforcer.commands.v1 / enforcer.commands.priority.v1 (key = endpoint_id) ----------


class EnforcePolicy(Message):
    """Command to the enforcer: make this policy the endpoint's desired policy."""

    type: Literal["EnforcePolicy"] = "EnforcePolicy"
    request_id: str
    policy: FrozenPolicy


# --- isolation.status.v1 (key = endpoint_id) -------------------------------------------


class PolicyStatusReported(Message):
    """The agent applied (with the rules' hash) or failed to apply a policy sequence."""

    type: Literal["PolicyStatusReported"] = "PolicyStatusReported"
    endpoint_id: str
    account_id: str
    policy_id: str
    sequence: int = Field(ge=1)
    status: Literal["applied", "failed"]
    rules_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    detail: str = Field("", max_length=2000)


# --- isolation.events.v1 (key = endpoint_id) --------------------------------------------


class IsolationStateChanged(Message):
    """Event: an endpoint's isolation state changed (full state, so the topic can be compacted).

    For other platform services: a ticketing or alerting service learns "applied" or "failed"
    without polling the REST API. Published at least once per change; a repeat carries the same
    state, so a consumer keeps the newest ``sequence`` (then the newest ``occurred_at``).
    """

    type: Literal["IsolationStateChanged"] = "IsolationStateChanged"
    endpoint_id: str = Field(description="The endpoint (the agent id).", examples=["3f1c…"])
    account_id: str = Field(description="The endpoint's account.", examples=["acct-1"])
    state: IsolationState = Field(description="The state after the change.")
    mode: PolicyMode | None = Field(
        None, description="Mode of the policy in force or pending; null before any policy."
    )
    sequence: int = Field(0, ge=0, description="Sequence of the policy in force or pending.")
    policy_id: str | None = Field(None, description="Id of the policy in force or pending.")
    request_ids: tuple[str, ...] = Field(
        (), description="The request(s) that issued the policy this state is about."
    )
    settings_version: int | None = Field(
        None, description="Allowlist version frozen into the policy (standard mode)."
    )
    rules_sha256: str | None = Field(
        None, description="SHA-256 of the rules the agent reported applied."
    )
    detail: str = Field("", max_length=2000, description="The agent's reason on failure.")


# --- audit.v1 (key = account_id) -------------------------------------------------------


class AuditRecorded(Message):
    """A change or a refused attempt, for the audit trail."""

    type: Literal["AuditRecorded"] = "AuditRecorded"
    service: Literal["settings", "isolation", "enforcer"]
    action: str = Field(examples=["allowlist.entry.add", "isolation.release"])
    outcome: Literal["ok", "denied", "rejected"]
    actor: Actor
    account_id: str | None = None
    endpoint_id: str | None = None
    detail: str = ""
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


# --- dlq.v1 (key = source topic) -------------------------------------------------------


class DeadLetter(Message):
    """A message a consumer could not accept, with the reason and where it came from."""

    type: Literal["DeadLetter"] = "DeadLetter"
    source_topic: str
    source_partition: int
    source_offset: int
    consumer_group: str
    reason: str
    key: str | None = None
    payload: str = Field(description="The raw value as text (truncated to 64 KiB).")
    payload_truncated: bool = False


TOPIC_MESSAGE_TYPES: dict[TopicName, Any] = {
    TopicName.SETTINGS_ALLOWLIST: AllowlistChanged,
    TopicName.ENDPOINTS: EndpointRegistered,
    TopicName.ISOLATION_REQUESTS: IsolationRequest,
    TopicName.ISOLATION_REQUESTS_PRIORITY: IsolationRequest,
    TopicName.ISOLATION_STATUS: PolicyStatusReported,
    TopicName.ISOLATION_EVENTS: IsolationStateChanged,
    TopicName.ENFORCER_COMMANDS: EnforcePolicy,
    TopicName.ENFORCER_COMMANDS_PRIORITY: EnforcePolicy,
    TopicName.AUDIT: AuditRecorded,
    TopicName.DLQ: DeadLetter,
}

_ADAPTERS: dict[TopicName, TypeAdapter[Any]] = {
    topic: TypeAdapter(model) for topic, model in TOPIC_MESSAGE_TYPES.items()
}


def decode(topic: TopicName, raw: bytes | None) -> Any:
    """Validate a raw value as the message type(s) of ``topic``; raises pydantic.ValidationError."""
    if raw is None:
        raise ValueError("empty value (tombstone) where a message was expected")
    return _ADAPTERS[topic].validate_json(raw)
