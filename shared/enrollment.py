"""The account enrollment key both the settings and the enforcer service derive the same way."""

from __future__ import annotations

import hashlib
import hmac


def enrollment_key(secret: str, account_id: str) -> str:
    """HMAC-SHA256 of the account id under ``HOSTISO_ENROLLMENT_SECRET``, hex (64 chars)."""
    return hmac.new(secret.encode(), f"enroll:{account_id}".encode(), hashlib.sha256).hexdigest()


def enrollment_key_matches(secret: str, account_id: str, presented: str) -> bool:
    return hmac.compare_digest(enrollment_key(secret, account_id), presented)
