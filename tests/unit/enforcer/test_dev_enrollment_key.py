"""The dev enrollment key check answers no, never raises, for any presented text."""

from __future__ import annotations

import pytest

from shared.enrollment import enrollment_key, enrollment_key_matches

pytestmark = pytest.mark.unit


def test_matching_key_is_accepted() -> None:
    assert enrollment_key_matches("s" * 32, "acct-1", enrollment_key("s" * 32, "acct-1"))


@pytest.mark.parametrize("presented", ["\u00c4\U0001d492", "\ud837", "", "hek_x_y"])
def test_non_ascii_or_wrong_key_is_refused_without_an_error(presented: str) -> None:
    assert enrollment_key_matches("s" * 32, "acct-1", presented) is False
