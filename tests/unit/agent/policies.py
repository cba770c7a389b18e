"""Test signing key and policy factory for the agent's tests (unit, integration, e2e)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.verification import key_id_of
from shared.messages import (
    AllowedPeer,
    FrozenPolicy,
    PolicyMode,
    SignedPolicy,
    canonical_policy_bytes,
)

ISSUED = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class TestSigner:
    """An Ed25519 key standing in for the enforcer's."""

    __test__ = False

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.raw_public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of(self.raw_public)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.raw_public).decode()

    def sign(self, policy: FrozenPolicy) -> SignedPolicy:
        signature = self.private.sign(canonical_policy_bytes(policy))
        return SignedPolicy(
            policy=policy, signature=base64.b64encode(signature).decode(), key_id=self.key_id
        )


def make_policy(
    *,
    endpoint_id: str = "ep-1",
    sequence: int = 1,
    mode: PolicyMode = "standard",
    allowed: tuple[str, ...] = ("203.0.113.10",),
    platform: tuple[str, ...] = ("198.51.100.1",),
    account_id: str = "acct-1",
) -> FrozenPolicy:
    return FrozenPolicy(
        policy_id=f"pol-{endpoint_id}-{sequence}",
        endpoint_id=endpoint_id,
        account_id=account_id,
        sequence=sequence,
        mode=mode,
        allowed_outbound=tuple(
            AllowedPeer(name=f"RMM {i}", address=a) for i, a in enumerate(allowed)
        )
        if mode == "standard"
        else (),
        platform=platform,
        settings_version=3,
        issued_at=ISSUED,
        issued_by="soc-analyst",
        reason="incident 42",
    )
