"""The allowlist rules without I/O: validation, transitions, If-Match."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.settings import domain
from services.settings.domain import (
    Allowlist,
    DuplicateAddressError,
    EntryLimitError,
    EntryNotFoundError,
    EntryRejectedError,
    InvalidIfMatchError,
    StaleVersionError,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ("rmm.example.com", "hostname"),
        ("10.0.0.0/8", "prefix_too_wide"),
        ("fe80::1", "link_local"),
        ("0.0.0.0", "this_network"),
        ("127.0.0.1", "loopback"),
        ("169.254.1.1", "link_local"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("010.0.0.1", "leading_zeros"),
        ("10.1", "shorthand"),
        ("0x7f.0.0.1", "non_decimal"),
        (" 10.0.0.1", "whitespace"),
        ("10.0.0.1:22", "port"),
        ("10.0.0.1-10.0.0.2", "range"),
        ("300.0.0.1", "octet_range"),
        ("", "required"),
        ("1" * 300, "too_long"),
        ("10.0.0.1;", "not_ip"),
        ("100.64.0.1", "shared_address_space"),
        ("100.127.255.254", "shared_address_space"),
        ("192.0.0.8", "ietf_protocol"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.254", "benchmarking"),
        ("192.88.99.1", "anycast"),
    ],
)
def test_each_address_rule_has_its_own_type(raw: str, rule: str) -> None:
    with pytest.raises(EntryRejectedError) as caught:
        domain.validate_address(raw)
    assert (caught.value.field, caught.value.rule) == ("address", rule)


def test_distinct_rules_have_distinct_messages() -> None:
    samples = [
        "a.example",
        "1.0.0.0/8",
        "::1",
        "0.0.0.1",
        "127.0.0.2",
        "169.254.0.1",
        "224.1.1.1",
        "241.0.0.1",
        "255.255.255.255",
        "01.1.1.1",
        "1.1",
        " 1.1.1.1",
        "100.64.0.1",
        "192.0.0.8",
        "198.18.0.1",
        "192.88.99.1",
    ]
    messages = set()
    for raw in samples:
        with pytest.raises(EntryRejectedError) as caught:
            domain.validate_address(raw)
        messages.add(caught.value.message)
    assert len(messages) == len(samples)


@pytest.mark.parametrize(
    "raw",
    [
        "192.168.0.1",
        "10.255.255.254",
        "172.16.0.1",
        "203.0.113.5",
        "100.63.255.255",
        "100.128.0.1",
        "192.0.1.1",
        "198.17.255.255",
        "198.20.0.1",
        "192.88.98.1",
    ],
)
def test_private_and_public_unicast_addresses_are_accepted(raw: str) -> None:
    assert domain.validate_address(raw) == raw


def test_names_are_trimmed_and_bounded() -> None:
    assert domain.validate_name("  RMM  ") == "RMM"
    assert domain.validate_name("x" * 64) == "x" * 64
    for bad, rule in [("", "required"), ("x" * 65, "too_long"), ("a\tb", "not_printable")]:
        with pytest.raises(EntryRejectedError) as caught:
            domain.validate_name(bad)
        assert caught.value.rule == rule


@pytest.mark.parametrize(
    "name",
    [
        "\u3164",  # Hangul filler
        "\u3164\u3164\u3164",
        "\u2800",  # braille pattern blank
        "\u115f",  # Hangul choseong filler
        "\u1160",  # Hangul jungseong filler
        "\uffa0",  # halfwidth Hangul filler
        "\u0301",  # a combining mark alone
        "\u0301\u0308\u20dd",
        "\u200b",  # zero-width space
        "\u200c\u200d\u2060\ufeff",  # zero-width (non-)joiners, word joiner, BOM
        "\u3164 \u2800 \u0301",
        "\u17b4\u17b5",  # Khmer inherent vowels
    ],
)
def test_blank_looking_names_are_refused_with_their_own_rule(name: str) -> None:
    with pytest.raises(EntryRejectedError) as caught:
        domain.validate_name(name)
    assert (caught.value.field, caught.value.rule) == ("name", "blank")
    assert "visible character" in caught.value.message


@pytest.mark.parametrize("name", ["e\u0301", "\u3164RMM", "\u2800\u2801", "Büro ✓", "控制台"])
def test_names_with_a_visible_character_are_accepted(name: str) -> None:
    assert domain.validate_name(name) == name


def _with_entries(n: int) -> Allowlist:
    state = Allowlist(account_id="a")
    for i in range(n):
        state = domain.add_entry(
            state,
            name=f"n{i}",
            address=f"10.0.0.{i + 1}",
            entry_id=f"e{i}",
            created_by="t",
            now=NOW,
            max_entries=100,
        ).after
    return state


def test_every_change_raises_the_version_by_one() -> None:
    state = _with_entries(2)
    assert state.version == 2
    enabled = domain.set_enabled(state, True, NOW)
    assert enabled is not None and enabled.after.version == 3 and enabled.after.enabled
    removed = domain.remove_entry(enabled.after, "e0", NOW)
    assert removed.after.version == 4
    assert [e.id for e in removed.after.entries] == ["e1"]


def test_no_op_changes_return_none() -> None:
    state = _with_entries(1)
    assert domain.set_enabled(state, False, NOW) is None
    assert domain.update_entry(state, "e0", name="n0", address=None, now=NOW) is None


def test_duplicates_and_limit_are_refused() -> None:
    state = _with_entries(2)
    with pytest.raises(DuplicateAddressError):
        domain.add_entry(
            state,
            name="x",
            address="10.0.0.1",
            entry_id="z",
            created_by="t",
            now=NOW,
            max_entries=100,
        )
    with pytest.raises(EntryLimitError):
        domain.add_entry(
            state,
            name="x",
            address="10.0.0.9",
            entry_id="z",
            created_by="t",
            now=NOW,
            max_entries=2,
        )
    with pytest.raises(DuplicateAddressError):
        domain.update_entry(state, "e1", name=None, address="10.0.0.1", now=NOW)
    with pytest.raises(EntryNotFoundError):
        domain.remove_entry(state, "nope", NOW)


def test_if_match_forms() -> None:
    assert domain.parse_if_match(None) is None
    assert domain.parse_if_match("*") is None
    assert domain.parse_if_match('"7"') == 7
    assert domain.parse_if_match('W/"7"') == 7
    assert domain.parse_if_match("7") == 7
    with pytest.raises(InvalidIfMatchError):
        domain.parse_if_match("seven")
    with pytest.raises(StaleVersionError):
        domain.check_version(_with_entries(1), 0)
