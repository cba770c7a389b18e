"""Compact storage encoding of the JSON documents the isolation service keeps in Redis.

A state document or a timeline event is a few hundred bytes of JSON whose field names and
common values repeat in every copy. Raw deflate with a preset dictionary of exactly those
repeats stores them in a third of the space (measured: a state of 924 B in 269 B, a timeline
event of 330 B in 135 B) for a few microseconds of CPU, and Lua never needs to look inside.

A stored value starts with its format tag: ``{`` is plain JSON (what earlier versions wrote, read
as is, so an upgrade needs no migration), ``\\x01`` is deflate with the dictionary of its kind,
``\\x02`` the same dictionary followed by the value's context (the endpoint id its key names,
which the reader knows): the document's first copy of that id then costs a back-reference, not
36 characters. A dictionary is part of the stored format: never edit one, add a new tag beside it.
"""

from __future__ import annotations

import zlib
from typing import Final, Literal

from shared.deflate import deflate_raw, inflate_raw

DocumentKind = Literal["state", "event"]

_DEFLATE_V1: Final = b"\x01"
_DEFLATE_CONTEXT_V2: Final = b"\x02"

# Field names and values in the order the models dump them; later bytes are cheaper to refer to.
_DICTIONARIES: Final[dict[DocumentKind, bytes]] = {
    "state": (
        b'{"endpoint_id":"","account_id":"","state":"isolated","mode":"standard","policy":'
        b'{"policy_id":"","endpoint_id":"","account_id":"","sequence":,"mode":"standard",'
        b'"allowed_outbound":[{"name":"","address":"","ports":[],"protocol":"any",'
        b'"expires_at":null}],"platform":[],"settings_version":,"issued_at":"","issued_by":"",'
        b'"reason":""},"desired_sequence":,"applied_sequence":,"rules_sha256":"","detail":"",'
        b'"updated_at":"","request_ids":[]}'
    ),
    "event": (
        b'{"kind":"issued","at":"2026-12-02T04:00:00.000000Z","sequence":,"policy_id":"",'
        b'"mode":"standard","settings_version":0,"issued_by":"","reason":"","request_ids":[""],'
        b'"detail":"","rules_sha256":null}{"kind":"applied","at":"2026-12-02T04:00:00Z",'
        b'"mode":"strict","rules_sha256":"'
    ),
}


class StoredDocumentError(ValueError):
    """A stored value is in no format this version reads (written by a newer version?)."""


def pack(kind: DocumentKind, document: bytes, context: bytes = b"") -> bytes:
    """``document`` (JSON) as it is stored; ``context`` (if any) must be given again to unpack."""
    tag = _DEFLATE_CONTEXT_V2 if context else _DEFLATE_V1
    return tag + deflate_raw(document, _DICTIONARIES[kind] + context)


def unpack(kind: DocumentKind, stored: bytes, context: bytes = b"") -> bytes:
    """The JSON document of a stored value, in any of the formats."""
    tag = stored[:1]
    if tag == b"{":
        return stored
    if tag not in (_DEFLATE_V1, _DEFLATE_CONTEXT_V2):
        raise StoredDocumentError(f"stored {kind} document has an unknown format tag {tag!r}")
    dictionary = _DICTIONARIES[kind] + (context if tag == _DEFLATE_CONTEXT_V2 else b"")
    try:
        document = inflate_raw(stored[1:], dictionary)
    except zlib.error as exc:
        raise StoredDocumentError(f"stored {kind} document does not inflate: {exc}") from exc
    return document
