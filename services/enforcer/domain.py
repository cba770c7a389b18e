"""Pure enforcer rules: sequence fencing, agent tokens and status-report checks (no I/O)."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from shared.messages import EnforcePolicy

Lane = str  # "priority" | "normal"
PRIORITY_LANE: Lane = "priority"
NORMAL_LANE: Lane = "normal"


class EnforcerError(Exception):
    """Base of the enforcer's named errors."""


class EnrollmentKeyRejectedError(EnforcerError):
    """The enrollment key does not belong to the account (unknown, malformed or revoked)."""


class EnrollmentRateLimitedError(EnforcerError):
    """The account used up its enrollment attempts of the current window."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EndpointOfAnotherAccountError(EnforcerError):
    """A re-enrollment names an endpoint id that is enrolled in another account."""


class EnrollmentConflictError(EnforcerError):
    """Two enrollments re-created the same endpoint id at once; the loser may retry."""


class EndpointLimitReachedError(EnforcerError):
    """The account already has as many enrolled endpoints as a deployment allows."""


class EnrollmentKeyNotFoundError(EnforcerError):
    """No enrollment key with that id in the account."""


class AccountAccessDeniedError(EnforcerError):
    """A partner asked about another account."""


class UnknownAgentTokenError(EnforcerError):
    """The bearer token is not the token of any enrolled agent."""


class PolicyNotHeldError(EnforcerError):
    """A status report names a sequence the enforcer does not hold as the endpoint's desired policy."""


class StatusReportInvalidError(EnforcerError):
    """A status report is self-contradictory (applied without a hash, failed without a reason)."""


class StoreOutcome(StrEnum):
    """What happened to one command's policy in the desired-state store."""

    STORED = "stored"
    # The store already holds this or a newer sequence: fencing keeps the newer one.
    STALE = "stale"
    # The policy names another account than the one the endpoint enrolled in (tenancy).
    WRONG_ACCOUNT = "wrong_account"


class ReissueOutcome(StrEnum):
    """What a re-enrollment with an endpoint id found in the agent store."""

    # The endpoint is enrolled in this account: it now has a new token, the old one is gone.
    REISSUED = "reissued"
    # The endpoint id belongs to another account (its agent or its desired policy says so).
    OTHER_ACCOUNT = "other_account"
    # This enforcer does not know the id (its store lost it): the caller may re-create it.
    UNKNOWN = "unknown"


class CreateOutcome(StrEnum):
    """What storing a new agent did."""

    CREATED = "created"
    # Another request enrolled this id first; nothing was written.
    ID_TAKEN = "id_taken"
    # The account is at its endpoint cap; nothing was written.
    ACCOUNT_FULL = "account_full"


@dataclass(frozen=True)
class AgentIdentity:
    """An enrolled agent as its token reveals it."""

    agent_id: str
    account_id: str


# A plain signed policy at least this long goes gzipped to a client that accepts it: a strict
# policy (about 470 B) gains a few dozen bytes for ~15 µs of CPU, one of 100 peers (8 KiB) half.
GZIP_MIN_BYTES = 1024


@dataclass(frozen=True)
class HeldPolicy:
    """The desired policy the enforcer holds for an endpoint.

    ``body`` is the signed policy JSON, or that JSON gzip-compressed when ``gzipped`` (records of
    earlier versions: served as they are to agents that accept gzip, decompressed for the others).
    """

    endpoint_id: str
    account_id: str
    policy_id: str
    sequence: int
    body: bytes
    gzipped: bool = False

    @property
    def signed_json(self) -> bytes:
        return gzip.decompress(self.body) if self.gzipped else self.body

    def encoded_for(self, accept_encoding: str) -> tuple[bytes, str | None]:
        """The body to send to a client that sent ``accept_encoding``, and its content coding."""
        if self.gzipped:
            if accepts_gzip(accept_encoding):
                return self.body, "gzip"
            return self.signed_json, None
        if len(self.body) >= GZIP_MIN_BYTES and accepts_gzip(accept_encoding):
            return gzip.compress(self.body, compresslevel=6, mtime=0), "gzip"
        return self.body, None


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header value allows gzip (``gzip`` or ``*``, q above 0)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        quality = params.strip().lower()
        if quality.startswith("q="):
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def new_agent_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The only form in which a token is stored: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


# Enrollment keys: ``hek_<key_id>_<secret>``. The key id is public (it names the key in lists,
# audits and revocations); the secret carries 256 bits from ``secrets`` and is stored only as
# the SHA-256 of the whole key. A plain hash suffices because the secret is high-entropy: there
# is no dictionary to try, so a slow password hash would buy nothing.
ENROLLMENT_KEY_PREFIX = "hek"
_ENROLLMENT_KEY = re.compile(r"^hek_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class EnrollmentKeyRecord:
    """What the enforcer keeps about one enrollment key: metadata and the key's digest."""

    key_id: str
    account_id: str
    key_sha256: str
    created_at: str
    created_by: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_enrollment_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``; the key is shown once and then only its digest is kept."""
    key_id = secrets.token_hex(8)
    return key_id, f"{ENROLLMENT_KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def enrollment_key_id(presented: str) -> str | None:
    """The key id a presented key names, or None when it is not shaped like an issued key."""
    match = _ENROLLMENT_KEY.match(presented)
    return match.group(1) if match else None


def enrollment_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_enrollment_key(
    record: EnrollmentKeyRecord | None, account_id: str, presented: str
) -> str:
    """The key id if ``presented`` is an active key of ``account_id``; else a named refusal.

    The digest is compared in constant time, and every refusal says the same thing, so the
    answer does not tell a guesser whether a key id exists or was revoked (key ids are not
    secret anyway: they appear in lists and audits).
    """
    digest = enrollment_key_digest(presented)
    if (
        record is None
        or record.account_id != account_id
        or not hmac.compare_digest(record.key_sha256, digest)
        or not record.active
    ):
        raise EnrollmentKeyRejectedError(
            f"enrollment_key: not an active enrollment key of account {account_id}"
        )
    return record.key_id


def is_newer(held_sequence: int | None, incoming_sequence: int) -> bool:
    """Fencing (guarantee 6): only a strictly higher sequence replaces the desired policy."""
    return held_sequence is None or incoming_sequence > held_sequence


def newest_per_endpoint(
    commands: Iterable[EnforcePolicy],
) -> tuple[list[EnforcePolicy], list[EnforcePolicy]]:
    """Split a batch into the newest command per endpoint and the ones it supersedes.

    Within one batch only the highest sequence per endpoint can win the compare-and-set, so the
    others need neither signing nor a round trip; they count as stale. Commands are grouped by
    endpoint *and* account, so a command naming a foreign account is never hidden behind a newer
    one: it reaches the store's tenancy check and is rejected on its own.
    """
    newest: dict[tuple[str, str], EnforcePolicy] = {}
    superseded: list[EnforcePolicy] = []
    for command in commands:
        key = (command.policy.endpoint_id, command.policy.account_id)
        current = newest.get(key)
        if current is None:
            newest[key] = command
        elif command.policy.sequence > current.policy.sequence:
            superseded.append(current)
            newest[key] = command
        else:
            superseded.append(command)
    return list(newest.values()), superseded


@dataclass(frozen=True)
class DesiredPolicyRef:
    """The desired sequence and policy id of an endpoint (what a status report must name)."""

    sequence: int
    policy_id: str


def check_status_report(
    held: HeldPolicy | DesiredPolicyRef | None,
    endpoint_id: str,
    sequence: int,
    policy_id: str,
) -> HeldPolicy | DesiredPolicyRef:
    """A report must name the policy the enforcer currently holds as desired for the endpoint.

    A report about a superseded sequence is refused (409) rather than forwarded: the agent will
    receive the newer policy on its next poll, and the isolation service must only ever see
    reports about policies that were issued and are still in force.
    """
    if held is None:
        raise PolicyNotHeldError(
            f"sequence: endpoint {endpoint_id} has no policy; sequence {sequence} was never issued"
        )
    if sequence < held.sequence:
        raise PolicyNotHeldError(
            f"sequence: {sequence} is superseded by the desired sequence {held.sequence}"
        )
    if sequence > held.sequence:
        raise PolicyNotHeldError(
            f"sequence: {sequence} was never issued; the desired sequence is {held.sequence}"
        )
    if policy_id != held.policy_id:
        raise PolicyNotHeldError(
            f"policy_id: {policy_id!r} is not the policy of sequence {sequence} ({held.policy_id!r})"
        )
    return held


def check_status_consistency(status: str, rules_sha256: str | None, detail: str) -> None:
    """``applied`` needs the rules' hash (guarantee 7); ``failed`` needs the agent's reason."""
    if status == "applied" and not rules_sha256:
        raise StatusReportInvalidError("rules_sha256: required when status is 'applied'")
    if status == "failed" and not detail.strip():
        raise StatusReportInvalidError("detail: the reason is required when status is 'failed'")
