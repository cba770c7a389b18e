"""The stored form of a desired policy: v2 (deflate with the record's own dictionary) and v1."""

from __future__ import annotations

import gzip
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.enforcer.adapters.redis_store import parse_policy_record, policy_record
from services.enforcer.signing import PolicySigner
from shared.messages import AllowedPeer, FrozenPolicy, SignedPolicy, utcnow


def signed(endpoint_id: str, peers: int = 0) -> tuple[FrozenPolicy, bytes]:
    policy = FrozenPolicy(
        policy_id=str(uuid.uuid4()),
        endpoint_id=endpoint_id,
        account_id="acct-strict",
        sequence=3,
        mode="standard" if peers else "strict",
        allowed_outbound=tuple(
            AllowedPeer(name=f"tool {i}", address=f"203.0.113.{i + 1}") for i in range(peers)
        ),
        platform=("198.51.100.1",),
        settings_version=2,
        issued_at=utcnow(),
        issued_by="soc-1",
        reason="RMM compromised",
    )
    signer = PolicySigner(Ed25519PrivateKey.generate())
    return policy, signer.sign(policy).model_dump_json().encode()


@pytest.mark.parametrize("peers", [0, 5, 100])
def test_a_stored_policy_reads_back_as_the_exact_signed_bytes(peers: int) -> None:
    endpoint = str(uuid.uuid4())
    policy, signed_json = signed(endpoint, peers)
    record = policy_record(policy.sequence, policy.policy_id, "acct-strict", endpoint, signed_json)
    held = parse_policy_record(endpoint, record)
    assert (held.sequence, held.policy_id, held.account_id) == (3, policy.policy_id, "acct-strict")
    assert held.signed_json == signed_json and not held.gzipped
    assert SignedPolicy.model_validate_json(held.signed_json).policy == policy


def test_the_record_is_far_smaller_than_gzip_with_the_ids_in_its_dictionary() -> None:
    endpoint = str(uuid.uuid4())
    policy, signed_json = signed(endpoint)
    record = policy_record(policy.sequence, policy.policy_id, "acct-strict", endpoint, signed_json)
    header = 20 + 6 + len(policy.policy_id) + len("acct-strict")
    # The signature (64 random bytes, base64) is most of what is left.
    assert len(record) - header < 0.6 * len(gzip.compress(signed_json, mtime=0))


def test_a_record_read_under_another_endpoint_does_not_inflate_to_its_policy() -> None:
    endpoint = str(uuid.uuid4())
    policy, signed_json = signed(endpoint)
    record = policy_record(policy.sequence, policy.policy_id, "acct-strict", endpoint, signed_json)
    try:
        held = parse_policy_record(str(uuid.uuid4()), record)
    except ValueError as exc:  # a stream that does not inflate is one acceptable answer
        assert "does not inflate" in str(exc)
        return
    # The other: bytes that are not the signed policy, which no agent would verify.
    assert held.signed_json != signed_json


def test_a_record_of_the_earlier_format_is_still_served_gzipped_as_stored() -> None:
    endpoint = str(uuid.uuid4())
    policy, signed_json = signed(endpoint)
    pid = policy.policy_id.encode()
    header = f"{3:020d}{len(pid):03d}{len(b'acct-strict'):03d}".encode() + pid + b"acct-strict"
    body = gzip.compress(signed_json, compresslevel=6, mtime=0)
    held = parse_policy_record(endpoint, header + body)
    assert held.gzipped and held.body == body and held.signed_json == signed_json
    assert held.encoded_for("gzip") == (body, "gzip")


def test_a_record_in_an_unknown_format_is_refused_by_name() -> None:
    header = f"{3:020d}{5:03d}{4:03d}".encode() + b"pol-1acct"
    with pytest.raises(ValueError, match="unknown body format"):
        parse_policy_record("ep-1", header + b"\x07rest")
