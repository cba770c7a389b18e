"""The stored form of a timeline event: a few dozen bytes of binary instead of deflated JSON.

Most of an event is what deflate cannot shrink: random ids (policy and request ids, UUIDs) and
the applied rules' SHA-256, each stored as text. This format keeps them as their bytes (16 for a
UUID in its canonical form, 32 for a lowercase hex digest), the time as microseconds and the
kind and mode as bits: an issued event with UUID ids takes ~60 B (deflated JSON ~103 B), a
report with its digest ~50 B (~78 B).

Layout after the tag ``\\x02``: one flags byte (kind: bits 0-1, mode: bits 2-3, rules_sha256
present: bit 4), ``at`` as a signed 64-bit little-endian count of microseconds since the epoch
(UTC), then varints ``sequence`` and ``settings_version``, then the texts ``policy_id``,
``issued_by``, ``reason``, a varint count and that many ``request_ids``, ``detail`` and, if
flagged, ``rules_sha256``. A text starts with a varint: 0 = a canonical UUID (16 bytes follow),
1 = a lowercase 64-digit hex digest (32 bytes follow), 2 = a canonical UUID, ``:`` and a text
(16 bytes, then that text: the per-endpoint request ids of an account-wide strict or a revoke),
n ≥ 3 = n - 3 bytes of UTF-8 follow.

An event this layout cannot hold exactly (a time that is not UTC, a number below 0 or from
2**64) is stored in the earlier format (deflated JSON, ``codec``); both are read, as is plain
JSON. The layout is a stored format: never change it, add a new tag beside it.
"""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime, timedelta
from typing import Final

from services.isolation.adapters.codec import StoredDocumentError, pack, unpack
from services.isolation.timeline import TimelineEvent, TimelineKind
from shared.messages import PolicyMode

_BINARY_V2: Final = 0x02
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_AT: Final = struct.Struct("<q")
_KINDS: Final[tuple[TimelineKind, ...]] = ("issued", "applied", "failed")
_KIND_BITS: Final[dict[str, int]] = {kind: n for n, kind in enumerate(_KINDS)}
_MODES: Final[tuple[PolicyMode | None, ...]] = (None, "standard", "strict", "none")
_MODE_BITS: Final[dict[str | None, int]] = {mode: n for n, mode in enumerate(_MODES)}
_HAS_RULES: Final = 0x10
_VARINT_LIMIT: Final = 2**64  # a larger number is stored as JSON (never met: sequences, versions)
_TEXT_UUID: Final = 0
_TEXT_DIGEST: Final = 1
_TEXT_UUID_AND: Final = 2
_TEXT_RAW: Final = 3
# str(uuid.UUID(...)) of any UUID matches this, and nothing else does: the canonical form.
_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_PREFIX: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:")
_DIGEST: Final = re.compile(r"[0-9a-f]{64}")


class _NotBinary(ValueError):
    """The event has a value the binary layout cannot hold exactly."""


def encode_event(event: TimelineEvent) -> bytes:
    """``event`` as it is stored: binary when it fits exactly, else the deflated JSON."""
    try:
        return _binary(event)
    except _NotBinary:
        return pack("event", event.model_dump_json(exclude_defaults=True).encode())


def decode_event(stored: bytes) -> TimelineEvent:
    """A stored event in any format this version wrote or writes."""
    if stored[:1] == bytes((_BINARY_V2,)):
        return _Reader(stored).event()
    return TimelineEvent.model_validate_json(unpack("event", stored))


def _binary(event: TimelineEvent) -> bytes:
    at = event.at
    offset = at.utcoffset()
    if offset is None or offset != timedelta(0):
        raise _NotBinary("not a UTC time")
    delta = at.replace(tzinfo=UTC) - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if not -(2**63) <= micros < 2**63:
        raise _NotBinary("time out of range")
    flags = _KIND_BITS[event.kind] | _MODE_BITS[event.mode] << 2
    if event.rules_sha256 is not None:
        flags |= _HAS_RULES
    out = bytearray((_BINARY_V2, flags))
    out += _AT.pack(micros)
    _varint(out, event.sequence)
    _varint(out, event.settings_version)
    _text(out, event.policy_id)
    _text(out, event.issued_by)
    _text(out, event.reason)
    _varint(out, len(event.request_ids))
    for request_id in event.request_ids:
        _text(out, request_id)
    _text(out, event.detail)
    if event.rules_sha256 is not None:
        _text(out, event.rules_sha256)
    return bytes(out)


def _varint(out: bytearray, value: int) -> None:
    if not 0 <= value < _VARINT_LIMIT:
        raise _NotBinary("number out of range")
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _text(out: bytearray, text: str) -> None:
    size = len(text)
    if size == 36 and _UUID.fullmatch(text):
        out.append(_TEXT_UUID)
        out += bytes.fromhex(text.replace("-", ""))
        return
    if size > 36 and _UUID_PREFIX.match(text):
        out.append(_TEXT_UUID_AND)
        out += bytes.fromhex(text[:36].replace("-", ""))
        _text(out, text[37:])
        return
    if size == 64 and _DIGEST.fullmatch(text):
        out.append(_TEXT_DIGEST)
        out += bytes.fromhex(text)
        return
    try:
        raw = text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: JSON keeps it as an escape
        raise _NotBinary("not UTF-8") from exc
    _varint(out, len(raw) + _TEXT_RAW)
    out += raw


class _Reader:
    def __init__(self, stored: bytes) -> None:
        self._data = stored
        self._pos = 1

    def event(self) -> TimelineEvent:
        flags = self._take(1)[0]
        kind, mode = flags & 0x03, flags >> 2 & 0x03
        if kind >= len(_KINDS) or flags & ~0x1F:
            raise StoredDocumentError(f"stored event has unknown flags {flags:#x}")
        (micros,) = _AT.unpack(self._take(_AT.size))
        try:
            at = _EPOCH + timedelta(microseconds=micros)
        except OverflowError as exc:
            raise StoredDocumentError("stored event has a time out of range") from exc
        sequence = self._varint()
        settings_version = self._varint()
        policy_id = self._text()
        issued_by = self._text()
        reason = self._text()
        request_ids = tuple(self._text() for _ in range(self._varint()))
        detail = self._text()
        rules_sha256 = self._text() if flags & _HAS_RULES else None
        if self._pos != len(self._data):
            raise StoredDocumentError("stored event has trailing bytes")
        return TimelineEvent(
            kind=_KINDS[kind],
            at=at,
            sequence=sequence,
            policy_id=policy_id,
            mode=_MODES[mode],
            settings_version=settings_version,
            issued_by=issued_by,
            reason=reason,
            request_ids=request_ids,
            detail=detail,
            rules_sha256=rules_sha256,
        )

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise StoredDocumentError("stored event is cut short")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def _varint(self) -> int:
        value = shift = 0
        while True:
            byte = self._take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise StoredDocumentError("stored event has an overlong number")

    def _text(self) -> str:
        header = self._varint()
        if header == _TEXT_UUID:
            return _uuid_text(self._take(16))
        if header == _TEXT_DIGEST:
            return self._take(32).hex()
        if header == _TEXT_UUID_AND:
            return f"{_uuid_text(self._take(16))}:{self._text()}"
        try:
            return self._take(header - _TEXT_RAW).decode()
        except UnicodeDecodeError as exc:
            raise StoredDocumentError(f"stored event has a text that is not UTF-8: {exc}") from exc


def _uuid_text(raw: bytes) -> str:
    """The canonical text of a UUID's 16 bytes (what ``str(uuid.UUID(bytes=raw))`` gives)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
