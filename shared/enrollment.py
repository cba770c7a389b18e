"""The dev-default enrollment key: an HMAC of the account id under ``HOSTISO_ENROLLMENT_SECRET``.

Dev default only. The enforcer accepts it only in dev mode (``HOSTISO_DEV=1``) and only until
the account's first issued key (``POST /v1/accounts/{account_id}/enrollment-keys``); outside dev
mode only issued, revocable keys open enrollment. It lets tests and the dev stack enroll agents
without provisioning a key first.
"""

from __future__ import annotations

import hashlib
import hmac


def enrollment_key(secret: str, account_id: str) -> str:
    """HMAC-SHA256 of the account id under ``HOSTISO_ENROLLMENT_SECRET``, hex (64 chars)."""
    return hmac.new(secret.encode(), f"enroll:{account_id}".encode(), hashlib.sha256).hexdigest()


def enrollment_key_matches(secret: str, account_id: str, presented: str) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a no).
    expected = enrollment_key(secret, account_id).encode()
    return hmac.compare_digest(expected, presented.encode("utf-8", "surrogatepass"))
