"""Allowlist v2 rules without I/O: ports, protocol, expiry, coverage, PATCH semantics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.settings import domain
from services.settings.domain import (
    KEEP,
    Allowlist,
    DuplicateAddressError,
    EntryLimits,
    EntryRejectedError,
)
from shared.messages import AllowlistEntry

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _entry(address: str, **extra: object) -> AllowlistEntry:
    return AllowlistEntry.model_validate(
        {
            "id": address,
            "name": address,
            "address": address,
            "created_at": NOW,
            "created_by": "a",
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        (_entry("198.51.100.0/24"), _entry("198.51.100.7"), True),
        (_entry("198.51.100.7"), _entry("198.51.100.0/24"), False),
        (_entry("2001:db8::/64"), _entry("198.51.100.7"), False),
        (_entry("203.0.113.10"), _entry("203.0.113.10", protocol="udp"), True),
        (_entry("203.0.113.10", protocol="tcp"), _entry("203.0.113.10", protocol="udp"), False),
        (
            _entry("203.0.113.10", protocol="tcp", ports=(22, 443)),
            _entry("203.0.113.10", protocol="tcp", ports=(443,)),
            True,
        ),
        (
            _entry("203.0.113.10", protocol="tcp", ports=(443,)),
            _entry("203.0.113.10", protocol="tcp"),
            False,
        ),
        (_entry("203.0.113.10", expires_at=NOW), _entry("203.0.113.10"), False),
        (
            _entry("203.0.113.10", expires_at=NOW + timedelta(hours=2)),
            _entry("203.0.113.10", expires_at=NOW + timedelta(hours=1)),
            True,
        ),
    ],
)
def test_coverage(outer: AllowlistEntry, inner: AllowlistEntry, covered: bool) -> None:
    assert domain.covers(outer, inner) is covered


def test_ports_are_sorted_and_v1_input_keeps_its_meaning() -> None:
    change = domain.add_entry(
        Allowlist(account_id="a"), name="RMM", address="203.0.113.10", entry_id="e1",
        created_by="x", now=NOW, max_entries=10,
    )  # fmt: skip
    entry = change.after.entries[0]
    assert (entry.ports, entry.protocol, entry.expires_at) == ((), "any", None)
    assert domain.validate_ports([8041, 22]) == (22, 8041)


def test_expiry_is_stored_as_utc_and_bounded() -> None:
    when = domain.validate_expires_at("2026-12-01T15:00:00+02:00", NOW)
    assert when == datetime(2026, 12, 1, 13, 0, tzinfo=UTC)
    assert domain.validate_expires_at((NOW + timedelta(days=90)).isoformat(), NOW)
    with pytest.raises(EntryRejectedError) as caught:
        domain.validate_expires_at((NOW + timedelta(days=90, seconds=1)).isoformat(), NOW)
    assert caught.value.rule == "too_far"
    with pytest.raises(EntryRejectedError) as caught:
        domain.validate_expires_at(NOW.isoformat(), NOW)
    assert caught.value.rule == "past"


def test_patch_keeps_or_clears_the_expiry_and_checks_coverage_against_the_others() -> None:
    start = Allowlist(account_id="a")
    first = domain.add_entry(
        start, name="wide", address="198.51.100.0/24", entry_id="w", created_by="x", now=NOW,
        max_entries=10,
    ).after  # fmt: skip
    second = domain.add_entry(
        first, name="tool", address="203.0.113.10", entry_id="t", created_by="x", now=NOW,
        max_entries=10, expires_at=(NOW + timedelta(hours=1)).isoformat(),
    ).after  # fmt: skip
    renamed = domain.update_entry(
        second, "t", name="tool 2", address=None, now=NOW, expires_at=KEEP
    )
    assert renamed is not None and renamed.entry is not None
    assert renamed.entry.expires_at == NOW + timedelta(hours=1)
    cleared = domain.update_entry(second, "t", name=None, address=None, now=NOW, expires_at=None)
    assert cleared is not None and cleared.entry is not None and cleared.entry.expires_at is None
    assert domain.update_entry(second, "t", name=None, address=None, now=NOW) is None
    with pytest.raises(DuplicateAddressError) as caught:
        domain.update_entry(second, "t", name=None, address="198.51.100.9", now=NOW)
    assert caught.value.covering.id == "w"


def test_prefix_limits_are_parameters() -> None:
    limits = EntryLimits(max_prefix_v4=28, max_prefix_v6=96)
    with pytest.raises(EntryRejectedError) as caught:
        domain.add_entry(
            Allowlist(account_id="a"), name="x", address="198.51.100.0/24", entry_id="e",
            created_by="x", now=NOW, max_entries=10, limits=limits,
        )  # fmt: skip
    assert caught.value.rule == "prefix_too_wide" and "/28" in caught.value.message
    assert domain.validate_address("2001:db8::/96", max_prefix_v6=96) == "2001:db8::/96"


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ("0001-01-01T00:00:00+01:00", "past"),
        ("9999-12-31T23:59:59-01:00", "too_far"),
        ("2026-12-01T12:00:00+25:00", "format"),
        ("2026-12-01 12:00:00Z", "format"),
    ],
)
def test_odd_expiry_times_get_a_rule_not_a_crash(raw: str, rule: str) -> None:
    with pytest.raises(EntryRejectedError) as caught:
        domain.validate_expires_at(raw, NOW)
    assert (caught.value.field, caught.value.rule) == ("expires_at", rule)
