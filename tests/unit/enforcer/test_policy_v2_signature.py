"""Policy v2 and signatures: a v1 policy signed before the new peer fields still verifies;
a v2 peer's ports, protocol and expiry are covered by the signature (DESIGN §5)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.enforcer.signing import (
    PolicySigner,
    generate_private_key_b64,
    parse_private_key,
    verify_signed_policy,
)
from shared.messages import AllowedPeer, SignedPolicy, canonical_policy_bytes, peer_key
from tests.samples import sample_policy

FIXTURE = Path(__file__).parent.parent / "fixtures" / "policy_v1_signed.json"
EXPIRES = datetime(2026, 12, 24, 8, 30, tzinfo=UTC)


def _signer() -> PolicySigner:
    return PolicySigner(parse_private_key(generate_private_key_b64()))


def test_a_v1_policy_signed_before_the_v2_fields_still_verifies() -> None:
    # Written by the enforcer before AllowedPeer had ports/protocol/expires_at.
    document = json.loads(FIXTURE.read_text())
    assert set(document["signed_policy"]["policy"]["allowed_outbound"][0]) == {"name", "address"}
    signed = SignedPolicy.model_validate_json(json.dumps(document["signed_policy"]))
    assert signed.policy.allowed_outbound[0].ports == ()
    assert verify_signed_policy(signed, base64.b64decode(document["public_key_b64"]))


def test_a_v1_policy_tampered_after_the_change_does_not_verify() -> None:
    document = json.loads(FIXTURE.read_text())
    document["signed_policy"]["policy"]["allowed_outbound"][0]["ports"] = [22]
    document["signed_policy"]["policy"]["allowed_outbound"][0]["protocol"] = "tcp"
    signed = SignedPolicy.model_validate_json(json.dumps(document["signed_policy"]))
    assert not verify_signed_policy(signed, base64.b64decode(document["public_key_b64"]))


def test_default_v2_fields_are_left_out_of_the_signed_bytes() -> None:
    policy = sample_policy()
    peers = json.loads(canonical_policy_bytes(policy))["allowed_outbound"]
    assert peers == [{"address": "203.0.113.10", "name": "RMM"}]


@pytest.mark.parametrize(
    "change",
    [
        {"ports": (8041, 22)},
        {"ports": ()},
        {"protocol": "udp"},
        {"expires_at": None},
        {"expires_at": datetime(2027, 1, 1, tzinfo=UTC)},
    ],
    ids=["port_added", "ports_dropped", "protocol", "expiry_dropped", "expiry_moved"],
)
def test_a_v2_peers_ports_protocol_and_expiry_are_signed(change: dict[str, object]) -> None:
    signer = _signer()
    policy = sample_policy(9)
    peer = AllowedPeer(
        name="RMM", address="2001:db8::10", ports=(8041,), protocol="tcp", expires_at=EXPIRES
    )
    signed = signer.sign(policy.model_copy(update={"allowed_outbound": (peer,)}))
    # Survives a round trip through its JSON (what the agent receives).
    received = SignedPolicy.model_validate_json(signed.model_dump_json())
    assert verify_signed_policy(received, signer.public_raw)
    canonical = json.loads(canonical_policy_bytes(received.policy))["allowed_outbound"][0]
    assert canonical["ports"] == [8041]
    assert canonical["protocol"] == "tcp"
    assert canonical["expires_at"] == "2026-12-24T08:30:00Z"
    altered = received.policy.model_copy(
        update={"allowed_outbound": (peer.model_copy(update=change),)}
    )
    assert not verify_signed_policy(
        received.model_copy(update={"policy": altered}), signer.public_raw
    )


def test_signed_policy_parts_stay_strict() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        AllowedPeer.model_validate({"name": "x", "address": "203.0.113.10", "weight": 1})


@pytest.mark.parametrize(
    ("fields", "rule"),
    [
        ({"ports": (22, 22), "protocol": "tcp"}, "ports_distinct"),
        ({"ports": (22,)}, "ports_need_protocol"),
        ({"ports": tuple(range(1, 18)), "protocol": "tcp"}, "ports_too_many"),
        ({"ports": (0,), "protocol": "tcp"}, "greater than or equal to 1"),
        ({"ports": (65536,), "protocol": "udp"}, "less than or equal to 65535"),
        ({"protocol": "icmp"}, "literal_error"),
        ({"expires_at": "2026-12-24T08:30:00"}, "timezone"),
    ],
)
def test_a_peer_that_cannot_be_rendered_is_refused(fields: dict[str, object], rule: str) -> None:
    with pytest.raises(ValidationError) as caught:
        AllowedPeer.model_validate({"name": "x", "address": "203.0.113.10", **fields})
    assert rule in str(caught.value) or rule in {e["type"] for e in caught.value.errors()}


def test_peer_key_is_canonical() -> None:
    assert peer_key("203.0.113.10/32", [443, 80], "tcp") == ("203.0.113.10", (80, 443), "tcp")
    assert peer_key("2001:DB8:0::10", (), "any") == ("2001:db8::10", (), "any")
    assert peer_key("2001:db8:1:0::/64", (), "any") == ("2001:db8:1::/64", (), "any")
    assert peer_key("203.0.113.10", (80, 443), "tcp") == peer_key("203.0.113.10", (443, 80), "tcp")
    assert peer_key("203.0.113.10", (80,), "tcp") != peer_key("203.0.113.10", (80,), "udp")
