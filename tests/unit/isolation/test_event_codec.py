"""The binary timeline event: it reads back exactly what the deflated JSON reads back, or is not used."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.isolation.adapters.codec import StoredDocumentError, pack
from services.isolation.adapters.event_codec import decode_event, encode_event
from services.isolation.timeline import TimelineEvent

AT = datetime(2026, 12, 2, 7, 45, 1, 123456, tzinfo=UTC)
POLICY = str(uuid.UUID(int=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0))
REQUEST = "0b1f5e2c-6a3d-4f7e-9c1a-2b3c4d5e6f70"
DIGEST = "ab" * 32

EVENTS = [
    TimelineEvent(
        kind="issued",
        at=AT,
        sequence=7,
        policy_id=POLICY,
        mode="standard",
        settings_version=3,
        issued_by="soc-1",
        reason="bench",
        request_ids=(REQUEST,),
    ),
    TimelineEvent(kind="applied", at=AT, sequence=7, rules_sha256=DIGEST),
    TimelineEvent(kind="failed", at=AT, sequence=1, detail="nft: permission denied"),
    TimelineEvent(kind="applied", at=AT, sequence=2, detail="", rules_sha256=None),
    # Not UUIDs or digests: kept as text (upper case, braces, no dashes, a revocation's id).
    TimelineEvent(
        kind="issued",
        at=AT,
        sequence=2**64 - 1,
        policy_id=POLICY.upper(),
        mode="none",
        settings_version=2**33,
        issued_by="ünïcode ✓",
        reason="r" * 300,
        request_ids=(
            f"{REQUEST}:ep-1",
            f"{REQUEST}:{REQUEST}",
            f"{REQUEST}:",
            f"{REQUEST.upper()}:ep-1",
            f"{REQUEST}-ep-1",
            "{" + REQUEST + "}",
            REQUEST.replace("-", ""),
            "",
        ),
    ),
    TimelineEvent(kind="issued", at=AT, sequence=3, policy_id=POLICY, mode="strict"),
    TimelineEvent(kind="issued", at=AT, sequence=4, mode=None),  # an older report-like row
    TimelineEvent(kind="applied", at=AT, sequence=5, rules_sha256=DIGEST.upper()),
    TimelineEvent(kind="applied", at=AT, sequence=5, rules_sha256="abc"),
    TimelineEvent(kind="applied", at=datetime(1960, 1, 1, tzinfo=UTC), sequence=0),
    TimelineEvent(kind="applied", at=datetime(1, 1, 1, tzinfo=UTC), sequence=0),
    TimelineEvent(
        kind="applied", at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), sequence=0
    ),
    TimelineEvent(
        kind="applied", at=AT.astimezone(timezone(timedelta(0), "Z")), sequence=1, policy_id="p"
    ),
]


def _json_read(event: TimelineEvent) -> TimelineEvent:
    """What the earlier format reads back for ``event``."""
    return decode_event(pack("event", event.model_dump_json(exclude_defaults=True).encode()))


@pytest.mark.parametrize("event", EVENTS)
def test_binary_reads_back_what_the_json_format_reads_back(event: TimelineEvent) -> None:
    stored = encode_event(event)
    assert stored[:1] == b"\x02"
    read = decode_event(stored)
    assert read == event == _json_read(event)
    assert read.model_dump_json() == _json_read(event).model_dump_json()


def test_binary_takes_much_less_than_the_deflated_json() -> None:
    """Random ids, as issued: 60 B against 103 B, 50 B against 78 B."""
    issued = EVENTS[0].model_copy(
        update={"policy_id": str(uuid.uuid4()), "request_ids": (str(uuid.uuid4()),)}
    )
    applied = EVENTS[1].model_copy(update={"rules_sha256": secrets.token_hex(32)})
    assert len(encode_event(issued)) <= 62
    assert len(encode_event(applied)) <= 50
    for event in (issued, applied):
        deflated = pack("event", event.model_dump_json(exclude_defaults=True).encode())
        assert len(encode_event(event)) < 0.7 * len(deflated)


@pytest.mark.parametrize(
    "event",
    [
        TimelineEvent(kind="applied", at=AT.astimezone(timezone(timedelta(hours=2))), sequence=1),
        TimelineEvent(kind="applied", at=datetime(2026, 12, 2, 7, 45), sequence=1),  # naive
        TimelineEvent(kind="applied", at=AT, sequence=-1),
        TimelineEvent(kind="applied", at=AT, sequence=2**64),
        TimelineEvent(kind="issued", at=AT, sequence=1, mode="strict", settings_version=-2),
    ],
)
def test_what_binary_cannot_hold_exactly_is_stored_as_before(event: TimelineEvent) -> None:
    stored = encode_event(event)
    assert stored[:1] == b"\x01"
    read = decode_event(stored)
    assert read == _json_read(event)
    assert read.model_dump_json() == event.model_dump_json()


def test_plain_json_of_the_first_version_still_reads() -> None:
    event = EVENTS[0]
    assert decode_event(event.model_dump_json().encode()) == event


@pytest.mark.parametrize(
    "stored",
    [
        b"\x02",
        b"\x02\x00",
        b"\x02\x03" + bytes(8) + b"\x00\x00\x03\x03\x03\x00\x03",  # kind 3
        b"\x02\x20" + bytes(8) + b"\x00\x00\x03\x03\x03\x00\x03",  # unknown flag
        b"\x02\x00" + bytes(8) + b"\x00\x00\x03\x03\x03\x00\x03\x00",  # trailing byte
        b"\x02\x00" + bytes(8) + b"\x00\x00\x00\x01",  # UUID cut short
        b"\x02\x00" + bytes(8) + b"\x00\x00\x06\xff\xfe\xfd",  # not UTF-8
        b"\x02\x00" + b"\xff" * 7 + b"\x7f" + b"\x00\x00\x03\x03\x03\x00\x03",  # year > 9999
        b"\x02\x00" + bytes(8) + b"\x80" * 30,  # overlong number
        b"\x02\x00" + bytes(8) + b"\x00\x00\x02" + bytes(16),  # UUID and: no text after
        b"\x09whatever",
    ],
)
def test_bad_stored_bytes_are_refused(stored: bytes) -> None:
    with pytest.raises(StoredDocumentError):
        decode_event(stored)


def test_a_minimal_binary_event_reads() -> None:
    stored = b"\x02\x01" + bytes(8) + b"\x00\x00\x03\x03\x03\x00\x03"
    assert decode_event(stored) == TimelineEvent(
        kind="applied", at=datetime(1970, 1, 1, tzinfo=UTC), sequence=0
    )


def test_uuids_and_digests_read_back_as_the_uuid_module_writes_them() -> None:
    for _ in range(500):
        raw = secrets.token_bytes(16)
        text = str(uuid.UUID(bytes=raw))
        digest = secrets.token_hex(32)
        event = TimelineEvent(
            kind="issued",
            at=AT,
            sequence=1,
            policy_id=text,
            mode="strict",
            request_ids=(f"{text}:ep-{raw[0]}", str(uuid.uuid4())),
            rules_sha256=digest,
        )
        stored = encode_event(event)
        assert len(stored) <= 2 + 8 + 2 + 17 + 2 + 2 + 1 + 17 + 6 + 17 + 1 + 33
        assert decode_event(stored) == event
