"""Enrollment-key rules and use cases on in-memory fakes (the Redis side is in the integration suite)."""

from __future__ import annotations

import dataclasses

import pytest

from services.enforcer.domain import (
    AccountAccessDeniedError,
    EnrollmentKeyRecord,
    EnrollmentKeyRejectedError,
    EnrollmentRateLimitedError,
    check_enrollment_key,
    enrollment_key_digest,
    enrollment_key_id,
    new_enrollment_key,
)
from services.enforcer.handlers import (
    authorize_key_admin,
    enroll_agent,
    rotate_enrollment_key,
)
from shared.enrollment import enrollment_key
from shared.messages import Actor
from tests.unit.enforcer.fakes import SECRET, CountingRateLimiter, make_deps

SOC = Actor(sub="soc@hq", role="soc")


def test_new_keys_are_random_parseable_and_carry_256_bits() -> None:
    key_id, key = new_enrollment_key()
    other_id, other = new_enrollment_key()
    assert key_id != other_id and key != other
    assert enrollment_key_id(key) == key_id
    secret = key.split("_", 2)[2]
    assert len(secret) == 43  # base64url of 32 random bytes
    assert enrollment_key_id(enrollment_key(SECRET, "acct-1")) is None
    assert enrollment_key_id(key + "x") is None


def _record(key: str, key_id: str, **changes: str | None) -> EnrollmentKeyRecord:
    record = EnrollmentKeyRecord(
        key_id=key_id,
        account_id="acct-1",
        key_sha256=enrollment_key_digest(key),
        created_at="2026-01-01T00:00:00+00:00",
        created_by="soc@hq",
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def test_a_key_opens_only_its_account_while_active() -> None:
    key_id, key = new_enrollment_key()
    assert check_enrollment_key(_record(key, key_id), "acct-1", key) == key_id
    refusals = [
        (None, "acct-1", key),
        (_record(key, key_id), "acct-2", key),
        (_record(key, key_id), "acct-1", key[:-1] + ("A" if key[-1] != "A" else "B")),
        (_record(key, key_id, revoked_at="2026-01-02T00:00:00+00:00"), "acct-1", key),
    ]
    for record, account, presented in refusals:
        with pytest.raises(EnrollmentKeyRejectedError, match="enrollment_key: not an active"):
            check_enrollment_key(record, account, presented)


async def test_the_derived_key_is_refused_without_a_dev_secret() -> None:
    deps, *_ = make_deps()
    deps.dev_enrollment_secret = None
    with pytest.raises(EnrollmentKeyRejectedError):
        await enroll_agent(
            deps,
            account_id="acct-1",
            enrollment_key=enrollment_key(SECRET, "acct-1"),
            hostname="h",
            platform="linux",
        )


async def test_a_rotation_whose_audit_fails_leaves_its_key_revoked() -> None:
    deps, _, _, events = make_deps()
    events.fail_next_audit = True
    with pytest.raises(ConnectionError):
        await rotate_enrollment_key(deps, SOC, "acct-1")
    [record] = await deps.enrollment_keys.for_account("acct-1")
    assert record.revoked_at is not None


async def test_rate_limit_counts_refused_keys_and_names_the_rule() -> None:
    deps, *_ = make_deps()
    deps.enrollment_rate = CountingRateLimiter(per_minute=2)
    for _ in range(2):
        with pytest.raises(EnrollmentKeyRejectedError):
            await enroll_agent(
                deps, account_id="acct-1", enrollment_key="guess", hostname="h", platform="linux"
            )
    with pytest.raises(EnrollmentRateLimitedError, match="at most 2 enrollment attempts") as exc:
        await enroll_agent(
            deps,
            account_id="acct-1",
            enrollment_key=enrollment_key(SECRET, "acct-1"),
            hostname="h",
            platform="linux",
        )
    assert exc.value.retry_after_s == 60


@pytest.mark.parametrize(
    ("actor", "allowed"),
    [
        (SOC, True),
        (Actor(sub="p", role="partner", account_id="acct-1"), True),
        (Actor(sub="p", role="partner", account_id="acct-2"), False),
        (Actor(sub="svc", role="service"), False),
    ],
)
async def test_only_the_soc_and_the_accounts_partner_manage_its_keys(
    actor: Actor, allowed: bool
) -> None:
    deps, _, _, events = make_deps()
    if allowed:
        await authorize_key_admin(deps, actor, "acct-1", "enrollment_key.rotate")
        assert events.audits == []
    else:
        with pytest.raises(AccountAccessDeniedError, match="account_id"):
            await authorize_key_admin(deps, actor, "acct-1", "enrollment_key.rotate")
        assert [(a.outcome, a.actor.sub) for a in events.audits] == [("denied", actor.sub)]
