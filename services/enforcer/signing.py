"""Ed25519 signing of frozen policies (pure: keys in, signatures out)."""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from shared.messages import FrozenPolicy, SignedPolicy, canonical_policy_bytes

ALGORITHM = "Ed25519"


class SigningKeyError(ValueError):
    """The configured signing key is not a base64 raw 32-byte Ed25519 private key."""


def key_id_for(public_raw: bytes) -> str:
    """First 16 hex characters of the SHA-256 of the raw public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def parse_private_key(encoded: str) -> Ed25519PrivateKey:
    """Decode ``HOSTISO_SIGNING_KEY`` (base64 of the raw 32-byte private key)."""
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningKeyError("HOSTISO_SIGNING_KEY: not valid base64") from exc
    if len(raw) != 32:
        raise SigningKeyError(
            f"HOSTISO_SIGNING_KEY: must decode to 32 raw bytes (Ed25519 private key), got {len(raw)}"
        )
    return Ed25519PrivateKey.from_private_bytes(raw)


def generate_private_key_b64() -> str:
    """A new private key, base64 of its raw 32 bytes."""
    raw = Ed25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )
    return base64.b64encode(raw).decode()


class PolicySigner:
    """Signs frozen policies with one Ed25519 key and publishes its public half."""

    def __init__(self, private_key: Ed25519PrivateKey, *, dev_key: bool = False) -> None:
        self._private_key = private_key
        self.public_raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_for(self.public_raw)
        self.dev_key = dev_key

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign(self, policy: FrozenPolicy) -> SignedPolicy:
        signature = self._private_key.sign(canonical_policy_bytes(policy))
        return SignedPolicy(
            policy=policy, signature=base64.b64encode(signature).decode(), key_id=self.key_id
        )


def verify_signed_policy(signed: SignedPolicy, public_raw: bytes) -> bool:
    """True if the signature is the key's signature over the canonical policy bytes."""
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_raw).verify(
            signature, canonical_policy_bytes(signed.policy)
        )
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
