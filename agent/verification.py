"""Policy verification (pure): signature, key, endpoint and sequence checks before anything is applied."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.messages import SignedPolicy, canonical_policy_bytes

RefusalKind = Literal["signature", "key", "account", "endpoint", "sequence"]


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


# At most the key in use and the next one: rotation is a configured change, never a message from
# the network (DESIGN.md §6, guarantee 11).
MAX_TRUSTED_KEYS = 2


def parse_trusted_keys(value: str) -> tuple[PinnedKey, ...]:
    """``CURRENT[,NEXT]``: one or two base64 Ed25519 public keys, comma-separated."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise SigningKeyError("signing public key: empty")
    if len(parts) > MAX_TRUSTED_KEYS:
        raise SigningKeyError(
            f"signing public key: at most {MAX_TRUSTED_KEYS} keys (current,next), got {len(parts)}"
        )
    return tuple(PinnedKey.from_base64(part) for part in parts)


def verify_policy(
    signed: SignedPolicy,
    *,
    key: PinnedKey | Sequence[PinnedKey],
    account_id: str,
    endpoint_id: str,
    last_applied_sequence: int,
) -> None:
    """Raise PolicyRefusedError unless the policy is signed by a trusted key, ours, and newer.

    ``key`` is the pinned key or the configured keys (current and next). The signature is
    checked first: account, endpoint and sequence fields are only meaningful once we know the
    enforcer wrote them. ``last_applied_sequence`` is the fence: the highest sequence verified.
    """
    keys = (key,) if isinstance(key, PinnedKey) else tuple(key)
    matching = next((k for k in keys if k.key_id == signed.key_id), None)
    if matching is None:
        trusted = ", ".join(repr(k.key_id) for k in keys)
        raise PolicyRefusedError(
            "key", f"signed with key_id {signed.key_id!r}, agent trusts {trusted}"
        )
    key = matching
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
    # A genuine policy of another account's endpoint (a forged enrollment answer can name one)
    # must not open this host, whatever its endpoint id says.
    if policy.account_id != account_id:
        raise PolicyRefusedError(
            "account", f"policy is for account {policy.account_id!r}, this is {account_id!r}"
        )
    if policy.endpoint_id != endpoint_id:
        raise PolicyRefusedError(
            "endpoint", f"policy is for endpoint {policy.endpoint_id!r}, this is {endpoint_id!r}"
        )
    if policy.sequence <= last_applied_sequence:
        raise PolicyRefusedError(
            "sequence",
            f"sequence {policy.sequence} is not above the last applied {last_applied_sequence}",
        )
