"""Ed25519 policy signatures: verify with the published key, fail when anything is tampered."""

from __future__ import annotations

import base64
import hashlib

import pytest

from services.enforcer.signing import (
    PolicySigner,
    SigningKeyError,
    generate_private_key_b64,
    key_id_for,
    parse_private_key,
    verify_signed_policy,
)
from shared.messages import AllowedPeer, canonical_policy_bytes
from tests.samples import sample_policy


@pytest.fixture
def signer() -> PolicySigner:
    return PolicySigner(parse_private_key(generate_private_key_b64()))


def test_signature_verifies_with_the_public_key(signer: PolicySigner) -> None:
    signed = signer.sign(sample_policy(7))
    assert verify_signed_policy(signed, base64.b64decode(signer.public_key_b64))
    assert signed.key_id == hashlib.sha256(signer.public_raw).hexdigest()[:16]
    assert signed.key_id == key_id_for(signer.public_raw)


def test_tampered_policy_or_signature_fails(signer: PolicySigner) -> None:
    signed = signer.sign(sample_policy(7))
    widened = signed.policy.model_copy(
        update={"allowed_outbound": (AllowedPeer(name="evil", address="198.51.100.66"),)}
    )
    assert not verify_signed_policy(
        signed.model_copy(update={"policy": widened}), signer.public_raw
    )
    bumped = signed.policy.model_copy(update={"sequence": 8})
    assert not verify_signed_policy(signed.model_copy(update={"policy": bumped}), signer.public_raw)
    raw = bytearray(base64.b64decode(signed.signature))
    raw[0] ^= 1
    forged = signed.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
    assert not verify_signed_policy(forged, signer.public_raw)
    assert not verify_signed_policy(
        signed.model_copy(update={"signature": "%%"}), signer.public_raw
    )


def test_other_key_does_not_verify(signer: PolicySigner) -> None:
    other = PolicySigner(parse_private_key(generate_private_key_b64()))
    assert not verify_signed_policy(signer.sign(sample_policy()), other.public_raw)


def test_signature_covers_the_canonical_bytes(signer: PolicySigner) -> None:
    policy = sample_policy(2)
    signed = signer.sign(policy)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(signer.public_raw).verify(
        base64.b64decode(signed.signature), canonical_policy_bytes(policy)
    )


@pytest.mark.parametrize(
    ("encoded", "rule"),
    [("not base64 !", "not valid base64"), (base64.b64encode(b"short").decode(), "32 raw bytes")],
)
def test_bad_signing_key_is_refused_with_the_rule(encoded: str, rule: str) -> None:
    with pytest.raises(SigningKeyError, match=rule):
        parse_private_key(encoded)
