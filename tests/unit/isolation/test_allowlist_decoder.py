"""The allowlist replica's decode memo answers exactly what parsing the stored bytes answers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from services.isolation.adapters.redis_store import AllowlistDecoder
from shared.messages import Actor, AllowlistChanged, AllowlistEntry

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def allowlist(version: int, entries: int = 3, account: str = "acct-1") -> bytes:
    return (
        AllowlistChanged(
            account_id=account,
            enabled=True,
            version=version,
            updated_at=NOW,
            changed_by=Actor(sub="soc", role="soc"),
            entries=tuple(
                AllowlistEntry(
                    id=f"e{i}",
                    name=f"RMM {i}",
                    address=f"203.0.113.{10 + i}",
                    created_at=NOW,
                    created_by="m",
                )
                for i in range(entries)
            ),
        )
        .model_dump_json()
        .encode()
    )


def test_the_memo_answers_what_parsing_answers_and_a_new_version_is_parsed() -> None:
    decoder = AllowlistDecoder(size=2)
    v1, v2 = allowlist(1), allowlist(2, entries=1)
    first = decoder.decode(v1)
    assert first == AllowlistChanged.model_validate_json(v1)
    assert decoder.decode(v1) is first  # the same bytes: not parsed again
    second = decoder.decode(v2)
    assert second == AllowlistChanged.model_validate_json(v2)
    assert second.version == 2 and len(second.entries) == 1
    assert decoder.decode(v1) is first


def test_the_memo_is_bounded_oldest_first_out() -> None:
    decoder = AllowlistDecoder(size=2)
    a, b, c = (allowlist(1, account=f"acct-{n}") for n in "abc")
    kept_a = decoder.decode(a)
    decoder.decode(b)
    decoder.decode(a)  # a is now the newest
    decoder.decode(c)  # b goes
    assert decoder.decode(a) is kept_a
    assert len(decoder._decoded) == 2 and b not in decoder._decoded


@pytest.mark.parametrize("stored", [b"", b"{", b'{"account_id": "acct-1"}', b"\x01junk"])
def test_bad_bytes_fail_as_parsing_fails_and_are_not_remembered(stored: bytes) -> None:
    decoder = AllowlistDecoder()
    with pytest.raises(ValidationError):
        AllowlistChanged.model_validate_json(stored)
    with pytest.raises(ValidationError):
        decoder.decode(stored)
    assert stored not in decoder._decoded
