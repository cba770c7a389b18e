"""The CLI reads RFC 9457 problem details, and still the older error bodies for a release."""

from __future__ import annotations

import pytest

from cli.client import describe_detail

pytestmark = pytest.mark.unit


def test_problem_detail_with_its_refused_fields() -> None:
    body = {
        "type": "about:blank",
        "title": "Invalid input",
        "status": 422,
        "detail": "invalid entry",
        "errors": [
            {"field": "body.address", "rule": "private", "message": "is a private address"},
            {"field": "body.name", "rule": "missing", "message": "Field required"},
        ],
    }
    assert describe_detail(body) == (
        "invalid entry; address: is a private address; name: Field required"
    )


def test_problem_whose_detail_already_says_the_message_is_not_repeated() -> None:
    message = "address 203.0.113.10 is already in this account's allowlist"
    body = {
        "detail": message,
        "errors": [{"field": "body.address", "rule": "duplicate", "message": message}],
    }
    assert describe_detail(body) == message


def test_older_bodies_still_read() -> None:
    assert describe_detail({"detail": "endpoint_id: no enrolled endpoint"}) == (
        "endpoint_id: no enrolled endpoint"
    )
    legacy = {"detail": [{"loc": ["body", "address"], "msg": "bad", "type": "value_error"}]}
    assert describe_detail(legacy) == "address: bad"
