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
    model_serializer,
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

    id: str = Field(
        default_factory=new_id,
        description="Unique message id (UUID).",
        examples=["0b7f1c52-3d4e-4a8f-9c61-2f5e8d9a0b13"],
    )
    occurred_at: datetime = Field(
        default_factory=utcnow,
        description="When it happened (UTC, RFC 3339).",
        examples=["2026-11-29T12:00:00Z"],
    )
    schema_version: Literal[1] = Field(
        SCHEMA_VERSION,
        description="Schema version of the type; a change older consumers must not ignore "
        "is a new version.",
        examples=[1],
    )

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Actor(Contract):
    """Who did something: the JWT subject and role, and the partner's account."""

    sub: str = Field(
        min_length=1,
        max_length=256,
        description="The token's subject (user, service or agent name).",
        examples=["alice@msp.example"],
    )
    role: Role = Field(description="The token's role.", examples=["partner", "soc"])
    account_id: str | None = Field(
        None, description="The partner's account; null for soc and service.", examples=["acct-1"]
    )


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

    id: str = Field(
        description="Entry id (UUID).", examples=["5d0c2a8e-8a3b-4f5e-9d1c-7b2a6e4f0c91"]
    )
    name: str = Field(
        min_length=1,
        max_length=64,
        description="Display name of the tool.",
        examples=["ConnectWise Automate"],
    )
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
    created_at: datetime = Field(
        description="When the entry was added (UTC).", examples=["2026-11-29T12:00:00Z"]
    )
    created_by: str = Field(description="Who added it (token subject).", examples=["alice"])


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

    name: str = Field(description="Display name of the peer.", examples=["Self-hosted RMM"])
    address: str = Field(
        description="Unicast IPv4/IPv6 address or prefix the endpoint may connect to.",
        examples=["203.0.113.10"],
    )
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

    # Left unannotated on purpose: an annotated wrap serializer replaces the model's schema in
    # the API documents. On the wire a v1-shaped peer stays ``{name, address}``, so an agent
    # that predates policy v2 (strict: unknown fields refused) still applies a v1-shaped policy.
    @model_serializer(mode="wrap")
    def _v1_shape_when_default(self, handler):  # type: ignore[no-untyped-def]
        data = handler(self)
        if isinstance(data, dict):
            for key, default in _PEER_V2_DEFAULTS.items():
                if key in data and data[key] in (default, ()):
                    del data[key]
        return data


# Policy v2 fields of a peer and their defaults: left out of the signed bytes when default.
_PEER_V2_DEFAULTS: dict[str, Any] = {"ports": [], "protocol": "any", "expires_at": None}


# --- settings.allowlist.v1 (compacted, key = account_id) -------------------------------


class EntryRevoked(Contract):
    """An entry revoked in this version ("this tool is compromised"): cut it everywhere."""

    revocation_id: str = Field(
        description="Idempotency key of the revocation; per-endpoint requests derive from it.",
        examples=["rev-3c1e"],
    )
    entry: AllowlistEntry = Field(
        description="The entry as it was when revoked.",
        examples=[
            {
                "id": "5d0c2a8e-8a3b-4f5e-9d1c-7b2a6e4f0c91",
                "name": "Self-hosted RMM",
                "address": "203.0.113.10",
                "created_at": "2026-11-29T12:00:00Z",
                "created_by": "alice",
            }
        ],
    )
    reason: str = Field(
        "",
        max_length=1000,
        description="Why, for the audit.",
        examples=["RMM server compromised"],
    )


class AllowlistChanged(Message):
    """Full state of an account's Tooling Allowlist after a change, at a strictly higher version."""

    type: Literal["AllowlistChanged"] = Field(
        "AllowlistChanged", description="Message type.", examples=["AllowlistChanged"]
    )
    account_id: str = Field(
        min_length=1, max_length=128, description="The account (also the key).", examples=["acct-1"]
    )
    enabled: bool = Field(description='The "Tooling Connections" switch.', examples=[True])
    entries: tuple[AllowlistEntry, ...] = Field(
        (),
        description="Every entry of the allowlist (full state, not a delta).",
        examples=[[]],
    )
    version: int = Field(
        ge=1, description="Settings version, strictly increasing per account.", examples=[7]
    )
    updated_at: datetime = Field(
        description="When this version was written (UTC).", examples=["2026-11-29T12:00:00Z"]
    )
    changed_by: Actor = Field(
        description="Who made the change.",
        examples=[{"sub": "alice", "role": "partner", "account_id": "acct-1"}],
    )
    revoked: tuple[EntryRevoked, ...] = Field(
        (),
        description="Entries this version revoked (removed, and to be cut from every isolated "
        "endpoint of the account that allows them, on the priority lanes).",
        examples=[[]],
    )


# --- endpoints.v1 (compacted, key = endpoint_id) ---------------------------------------


class EndpointRegistered(Message):
    """An endpoint (agent) enrolled, or polled again: its account, host and when it was last seen.

    The topic is compacted by endpoint, so every record carries the full registration.
    """

    type: Literal["EndpointRegistered"] = Field(
        "EndpointRegistered", description="Message type.", examples=["EndpointRegistered"]
    )
    endpoint_id: str = Field(
        min_length=1, max_length=128, description="The endpoint (also the key).", examples=["ep-1"]
    )
    account_id: str = Field(
        min_length=1, max_length=128, description="Its account.", examples=["acct-1"]
    )
    hostname: str = Field(
        min_length=1,
        max_length=255,
        description="Host name the agent reported.",
        examples=["web-01"],
    )
    platform: Literal["linux", "windows", "macos"] = Field(
        description="Operating system family.", examples=["linux"]
    )
    enrolled_at: datetime = Field(
        description="When it (re-)enrolled (UTC).", examples=["2026-11-29T12:00:00Z"]
    )
    last_seen: datetime | None = Field(
        None,
        description="When the agent last polled for a policy (at most one update per"
        " HOSTISO_LAST_SEEN_INTERVAL_S); null until the first poll after enrollment.",
        examples=["2026-11-29T12:05:00Z"],
    )


# --- isolation.requests.v1 / isolation.requests.priority.v1 (key = endpoint_id) --------


class IsolateEndpoint(Message):
    """Command: isolate an endpoint, standard (frozen allowlist) or strict (platform only)."""

    type: Literal["IsolateEndpoint"] = Field(
        "IsolateEndpoint", description="Message type.", examples=["IsolateEndpoint"]
    )
    request_id: str = Field(
        default_factory=new_id,
        description="Idempotency key: a redelivered request issues no second policy.",
        examples=["req-7f3a"],
    )
    endpoint_id: str = Field(
        min_length=1, max_length=128, description="The endpoint (also the key).", examples=["ep-1"]
    )
    mode: IsolationMode = Field(
        description="standard: frozen allowlist snapshot; strict: the platform only.",
        examples=["standard"],
    )
    reason: str = Field(
        "", max_length=1000, description="Why, for the audit.", examples=["incident 4711"]
    )
    requested_by: Actor = Field(
        description="Who asked.", examples=[{"sub": "soc-analyst", "role": "soc"}]
    )


class ReleaseEndpoint(Message):
    """Command: release an isolated endpoint (policy mode ``none``)."""

    type: Literal["ReleaseEndpoint"] = Field(
        "ReleaseEndpoint", description="Message type.", examples=["ReleaseEndpoint"]
    )
    request_id: str = Field(
        default_factory=new_id, description="Idempotency key.", examples=["req-7f3b"]
    )
    endpoint_id: str = Field(
        min_length=1, max_length=128, description="The endpoint (also the key).", examples=["ep-1"]
    )
    reason: str = Field(
        "", max_length=1000, description="Why, for the audit.", examples=["resolved"]
    )
    requested_by: Actor = Field(
        description="Who asked.", examples=[{"sub": "soc-analyst", "role": "soc"}]
    )


class StrictIsolateAccount(Message):
    """Command: strictly isolate every isolated or pending endpoint of an account (RMM compromised)."""

    type: Literal["StrictIsolateAccount"] = Field(
        "StrictIsolateAccount", description="Message type.", examples=["StrictIsolateAccount"]
    )
    request_id: str = Field(
        default_factory=new_id,
        description="Idempotency key; the per-endpoint requests derive their ids from it.",
        examples=["req-7f3c"],
    )
    account_id: str = Field(
        min_length=1, max_length=128, description="The account.", examples=["acct-1"]
    )
    reason: str = Field(
        "", max_length=1000, description="Why, for the audit.", examples=["RMM compromised"]
    )
    disable_allowlist: bool = Field(
        True, description="Also switch Tooling Connections off.", examples=[True]
    )
    requested_by: Actor = Field(
        description="Who asked.", examples=[{"sub": "soc-analyst", "role": "soc"}]
    )


class RevokeEndpointPeer(Message):
    """Command: issue the endpoint its policy without the revoked entry (same mode, next sequence).

    One per affected endpoint, fanned out from an ``AllowlistChanged`` that revoked the entry,
    on the priority lane; ``request_id`` is ``<revocation_id>:<endpoint_id>``.
    """

    type: Literal["RevokeEndpointPeer"] = Field(
        "RevokeEndpointPeer", description="Message type.", examples=["RevokeEndpointPeer"]
    )
    request_id: str = Field(
        description="``<revocation_id>:<endpoint_id>``: a redelivery issues no second policy.",
        examples=["rev-3c1e:ep-1"],
    )
    endpoint_id: str = Field(
        min_length=1, max_length=128, description="The endpoint (also the key).", examples=["ep-1"]
    )
    account_id: str = Field(
        min_length=1, max_length=128, description="The entry's account.", examples=["acct-1"]
    )
    revocation_id: str = Field(description="The revocation it derives from.", examples=["rev-3c1e"])
    entry: AllowlistEntry = Field(
        description="The revoked entry.",
        examples=[
            {
                "id": "5d0c2a8e-8a3b-4f5e-9d1c-7b2a6e4f0c91",
                "name": "Self-hosted RMM",
                "address": "203.0.113.10",
                "created_at": "2026-11-29T12:00:00Z",
                "created_by": "alice",
            }
        ],
    )
    settings_version: int = Field(
        ge=1, description="The settings version that revoked it.", examples=[8]
    )
    reason: str = Field(
        "", max_length=1000, description="Why, for the audit.", examples=["RMM server compromised"]
    )
    requested_by: Actor = Field(
        description="Who revoked the entry.",
        examples=[{"sub": "soc-analyst", "role": "soc"}],
    )


class RefreshIsolation(Message):
    """Command: a standard isolation takes a new snapshot of the current allowlist, no release."""

    type: Literal["RefreshIsolation"] = Field(
        "RefreshIsolation", description="Message type.", examples=["RefreshIsolation"]
    )
    request_id: str = Field(
        default_factory=new_id,
        description="Idempotency key: a redelivered request issues no second policy.",
        examples=["req-9b2d"],
    )
    endpoint_id: str = Field(
        min_length=1, max_length=128, description="The endpoint (also the key).", examples=["ep-1"]
    )
    reason: str = Field(
        "", max_length=1000, description="Why, for the audit.", examples=["new RMM relay added"]
    )
    requested_by: Actor = Field(
        description="Who asked.",
        examples=[{"sub": "alice", "role": "partner", "account_id": "acct-1"}],
    )


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

    policy_id: str = Field(description="Policy id (UUID).", examples=["pol-1"])
    endpoint_id: str = Field(description="The endpoint it is for.", examples=["ep-1"])
    account_id: str = Field(description="The endpoint's account.", examples=["acct-1"])
    sequence: int = Field(ge=1, description="Strictly increasing per endpoint.", examples=[3])
    mode: PolicyMode = Field(
        description="standard, strict, or none (a release).", examples=["standard"]
    )
    allowed_outbound: tuple[AllowedPeer, ...] = Field(
        (),
        description="Peers the endpoint may open connections to (the frozen allowlist).",
        examples=[[{"name": "RMM", "address": "203.0.113.10"}]],
    )
    platform: tuple[str, ...] = Field(
        (),
        description="The platform's addresses, always reachable.",
        examples=[["198.51.100.1"]],
    )
    settings_version: int = Field(
        ge=0, description="Settings version the snapshot came from.", examples=[7]
    )
    issued_at: datetime = Field(
        description="When it was issued (UTC).", examples=["2026-11-29T12:00:00Z"]
    )
    issued_by: str = Field(description="Who asked for it (token subject).", examples=["alice"])
    reason: str = Field("", description="Why, as given by the requester.", examples=["incident 42"])

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

    type: Literal["EnforcePolicy"] = Field(
        "EnforcePolicy", description="Message type.", examples=["EnforcePolicy"]
    )
    request_id: str = Field(
        description="The request that issued the policy.", examples=["req-7f3a"]
    )
    policy: FrozenPolicy = Field(
        description="The frozen policy to sign and deliver.",
        examples=[
            {
                "policy_id": "pol-1",
                "endpoint_id": "ep-1",
                "account_id": "acct-1",
                "sequence": 3,
                "mode": "strict",
                "platform": ["198.51.100.1"],
                "settings_version": 7,
                "issued_at": "2026-11-29T12:00:00Z",
                "issued_by": "soc-analyst",
            }
        ],
    )


# --- isolation.status.v1 (key = endpoint_id) -------------------------------------------


class PolicyStatusReported(Message):
    """The agent applied (with the rules' hash) or failed to apply a policy sequence."""

    type: Literal["PolicyStatusReported"] = Field(
        "PolicyStatusReported", description="Message type.", examples=["PolicyStatusReported"]
    )
    endpoint_id: str = Field(description="The endpoint (also the key).", examples=["ep-1"])
    account_id: str = Field(description="Its account.", examples=["acct-1"])
    policy_id: str = Field(description="The policy reported on.", examples=["pol-1"])
    sequence: int = Field(ge=1, description="The policy's sequence.", examples=[3])
    status: Literal["applied", "failed"] = Field(
        description="What the agent did.", examples=["applied"]
    )
    rules_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the rules in force (applied); null when failed.",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    detail: str = Field(
        "", max_length=2000, description="The agent's reason when failed.", examples=[""]
    )


class AllowlistUsage(Contract):
    """Traffic one allowed entry of the policy in force let through, as the agent counted it."""

    address: str = Field(
        description="The entry's address or prefix, as in the policy.",
        examples=["203.0.113.10"],
    )
    ports: tuple[Port, ...] = Field((), description=_PORTS_DESCRIPTION, examples=[[8041]])
    protocol: PeerProtocol = Field("any", description=_PROTOCOL_DESCRIPTION, examples=["tcp"])
    packets: int = Field(ge=0, description="Packets counted (both directions).", examples=[42])
    bytes: int = Field(ge=0, description="Bytes counted (both directions).", examples=[5120])
    last_seen: datetime | None = Field(
        None,
        description="When the agent last saw the count rise (UTC); null if never.",
        examples=["2026-11-29T12:05:00Z"],
    )


class AllowlistUsageReported(Message):
    """The agent's counted deltas per allowed entry of the policy in force (DESIGN §4).

    Deltas since the agent's previous report of the same sequence: a consumer adds them up per
    sequence, and starts from zero when the sequence changes (a superseded policy's counts are
    never mixed into the new one). Repeats carry the same ``id``.
    """

    type: Literal["AllowlistUsageReported"] = Field(
        "AllowlistUsageReported", description="Message type.", examples=["AllowlistUsageReported"]
    )
    endpoint_id: str = Field(description="The endpoint (also the key).", examples=["ep-1"])
    account_id: str = Field(description="Its account.", examples=["acct-1"])
    sequence: int = Field(
        ge=1, description="The sequence of the policy in force counted.", examples=[3]
    )
    counters: tuple[AllowlistUsage, ...] = Field(
        (),
        max_length=100,
        description="Deltas per entry (at most 100).",
        examples=[
            [
                {
                    "address": "203.0.113.10",
                    "ports": [8041],
                    "protocol": "tcp",
                    "packets": 42,
                    "bytes": 5120,
                    "last_seen": "2026-11-29T12:05:00Z",
                }
            ]
        ],
    )


IsolationStatusMessage = Annotated[
    PolicyStatusReported | AllowlistUsageReported, Field(discriminator="type")
]


# --- isolation.events.v1 (key = endpoint_id) --------------------------------------------


class IsolationStateChanged(Message):
    """Event: an endpoint's isolation state changed (full state, so the topic can be compacted).

    For other platform services: a ticketing or alerting service learns "applied" or "failed"
    without polling the REST API. Published at least once per change; a repeat carries the same
    state, so a consumer keeps the newest ``sequence`` (then the newest ``occurred_at``).
    """

    type: Literal["IsolationStateChanged"] = Field(
        "IsolationStateChanged", description="Message type.", examples=["IsolationStateChanged"]
    )
    endpoint_id: str = Field(
        description="The endpoint (the agent id; also the key).", examples=["ep-1"]
    )
    account_id: str = Field(description="The endpoint's account.", examples=["acct-1"])
    state: IsolationState = Field(description="The state after the change.", examples=["isolated"])
    mode: PolicyMode | None = Field(
        None,
        description="Mode of the policy in force or pending; null before any policy.",
        examples=["standard"],
    )
    sequence: int = Field(
        0, ge=0, description="Sequence of the policy in force or pending.", examples=[3]
    )
    policy_id: str | None = Field(
        None, description="Id of the policy in force or pending.", examples=["pol-1"]
    )
    request_ids: tuple[str, ...] = Field(
        (),
        description="The request(s) that issued the policy this state is about.",
        examples=[["req-7f3a"]],
    )
    settings_version: int | None = Field(
        None, description="Allowlist version frozen into the policy (standard mode).", examples=[7]
    )
    rules_sha256: str | None = Field(
        None,
        description="SHA-256 of the rules the agent reported applied.",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    detail: str = Field(
        "", max_length=2000, description="The agent's reason on failure.", examples=[""]
    )


# --- audit.v1 (key = account_id) -------------------------------------------------------


class AuditRecorded(Message):
    """A change or a refused attempt, for the audit trail."""

    type: Literal["AuditRecorded"] = Field(
        "AuditRecorded", description="Message type.", examples=["AuditRecorded"]
    )
    service: Literal["settings", "isolation", "enforcer"] = Field(
        description="The service that recorded it.", examples=["settings"]
    )
    action: str = Field(
        description="What was done or attempted.",
        examples=["allowlist.entry.add", "isolation.release"],
    )
    outcome: Literal["ok", "denied", "rejected"] = Field(
        description="ok; denied (not allowed); rejected (invalid).", examples=["ok"]
    )
    actor: Actor = Field(
        description="Who did it.",
        examples=[{"sub": "alice", "role": "partner", "account_id": "acct-1"}],
    )
    account_id: str | None = Field(
        None, description="The account (also the key).", examples=["acct-1"]
    )
    endpoint_id: str | None = Field(None, description="The endpoint, if any.", examples=["ep-1"])
    detail: str = Field(
        "", description="What happened, for a person.", examples=["address 203.0.113.10"]
    )
    before: dict[str, Any] | None = Field(
        None, description="The changed part before (null when added).", examples=[None]
    )
    after: dict[str, Any] | None = Field(
        None,
        description="The changed part after (null when removed).",
        examples=[{"name": "RMM", "address": "203.0.113.10"}],
    )


# --- dlq.v1 (key = source topic) -------------------------------------------------------


class DeadLetter(Message):
    """A message a consumer could not accept, with the reason and where it came from."""

    type: Literal["DeadLetter"] = Field(
        "DeadLetter", description="Message type.", examples=["DeadLetter"]
    )
    source_topic: str = Field(
        description="Topic of the refused record (also the key).",
        examples=["hostiso.isolation.requests.v1"],
    )
    source_partition: int = Field(description="Its partition.", examples=[2])
    source_offset: int = Field(description="Its offset.", examples=[1042])
    consumer_group: str = Field(
        description="The consumer that refused it.", examples=["hostiso.isolation"]
    )
    reason: str = Field(
        description="Why it was refused.", examples=["validation error: mode: Input should be ..."]
    )
    key: str | None = Field(None, description="The record's key as text.", examples=["ep-1"])
    payload: str = Field(
        description="The raw value as text (truncated to 64 KiB).", examples=['{"type": "Isol']
    )
    payload_truncated: bool = Field(
        False, description="True when payload was cut at 64 KiB.", examples=[False]
    )


TOPIC_MESSAGE_TYPES: dict[TopicName, Any] = {
    TopicName.SETTINGS_ALLOWLIST: AllowlistChanged,
    TopicName.ENDPOINTS: EndpointRegistered,
    TopicName.ISOLATION_REQUESTS: IsolationRequest,
    TopicName.ISOLATION_REQUESTS_PRIORITY: IsolationRequest,
    TopicName.ISOLATION_STATUS: IsolationStatusMessage,
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
