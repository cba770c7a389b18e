"""Policy verification (pure): signature, key, endpoint and sequence checks before anything is applied."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.messages import SignedPolicy, canonical_policy_bytes

RefusalKind = Literal["signature", "key", "endpoint", "sequence"]


class SigningKeyError(ValueError):
    """The configured or fetched signing public key is not a base64 raw 32-byte Ed25519 key."""


class PolicyRefusedError(Exception):
    """A delivered policy failed verification; ``kind`` says which check, ``reason`` says why."""

    def __init__(self, kind: RefusalKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: RefusalKind = kind
        self.reason = reason


def key_id_of(raw_public_key: bytes) -> str:
    """First 16 hex characters of the SHA-256 of the raw public key (contracts.md)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PinnedKey:
    """The enforcer's Ed25519 public key the agent trusts, and its key id."""

    raw: bytes
    key_id: str

    @cached_property
    def public_key(self) -> Ed25519PublicKey:
        """Parsed once per key rather than once per verified policy."""
        return Ed25519PublicKey.from_public_bytes(self.raw)

    @classmethod
    def from_base64(cls, value: str) -> PinnedKey:
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SigningKeyError("signing public key: not valid base64") from exc
        if len(raw) != 32:
            raise SigningKeyError(
                f"signing public key: expected 32 raw Ed25519 bytes, got {len(raw)}"
            )
        return cls(raw=raw, key_id=key_id_of(raw))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode()


def verify_policy(
    signed: SignedPolicy, *, key: PinnedKey, endpoint_id: str, last_applied_sequence: int
) -> None:
    """Raise PolicyRefusedError unless the policy is signed by ``key``, ours, and newer.

    The signature is checked first: endpoint and sequence fields are only meaningful once
    we know the enforcer wrote them.
    """
    if signed.key_id != key.key_id:
        raise PolicyRefusedError(
            "key", f"signed with key_id {signed.key_id!r}, agent trusts {key.key_id!r}"
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PolicyRefusedError("signature", "signature is not valid base64") from exc
    try:
        key.public_key.verify(signature, canonical_policy_bytes(signed.policy))
    except InvalidSignature as exc:
        raise PolicyRefusedError(
            "signature", "signature does not verify (policy tampered or wrong key)"
        ) from exc
    policy = signed.policy
    if policy.endpoint_id != endpoint_id:
        raise PolicyRefusedError(
            "endpoint", f"policy is for endpoint {policy.endpoint_id!r}, this is {endpoint_id!r}"
        )
    if policy.sequence <= last_applied_sequence:
        raise PolicyRefusedError(
            "sequence",
            f"sequence {policy.sequence} is not above the last applied {last_applied_sequence}",
        )
