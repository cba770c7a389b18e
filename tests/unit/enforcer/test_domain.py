"""Pure enforcer rules: fencing, batch dedup, token scope, status-report checks."""

from __future__ import annotations

import gzip

import pytest

from services.enforcer.domain import (
    HeldPolicy,
    PolicyNotHeldError,
    StatusReportInvalidError,
    accepts_gzip,
    check_status_consistency,
    check_status_report,
    is_newer,
    new_agent_token,
    newest_per_endpoint,
    token_digest,
)
from shared.messages import EnforcePolicy
from tests.samples import sample_policy


def command(endpoint_id: str, sequence: int, account_id: str = "acct-1") -> EnforcePolicy:
    policy = sample_policy(sequence).model_copy(
        update={"endpoint_id": endpoint_id, "account_id": account_id}
    )
    return EnforcePolicy(request_id=f"r-{endpoint_id}-{sequence}", policy=policy)


def held(sequence: int = 3, policy_id: str = "pol-1") -> HeldPolicy:
    return HeldPolicy("ep-1", "acct-1", policy_id, sequence, b"{}")


def test_only_a_strictly_higher_sequence_is_newer() -> None:
    assert is_newer(None, 1)
    assert is_newer(2, 3)
    assert not is_newer(3, 3)
    assert not is_newer(3, 2)


def test_batch_keeps_the_highest_sequence_per_endpoint_whatever_the_order() -> None:
    batch = [command("a", 2), command("b", 1), command("a", 5), command("a", 4), command("a", 5)]
    newest, superseded = newest_per_endpoint(batch)
    assert {(c.policy.endpoint_id, c.policy.sequence) for c in newest} == {("a", 5), ("b", 1)}
    assert len(superseded) == 3


def test_batch_never_hides_a_foreign_account_command_behind_a_newer_one() -> None:
    newest, superseded = newest_per_endpoint([command("a", 1, "acct-2"), command("a", 2)])
    assert {(c.policy.account_id, c.policy.sequence) for c in newest} == {
        ("acct-2", 1),
        ("acct-1", 2),
    }
    assert superseded == []


def test_token_is_random_and_stored_only_as_its_sha256() -> None:
    first, second = new_agent_token(), new_agent_token()
    assert first != second and len(first) >= 40
    assert len(token_digest(first)) == 64 and token_digest(first) != first
    assert token_digest(first) == token_digest(first)


def test_report_must_name_the_desired_sequence_and_policy() -> None:
    assert check_status_report(held(3), "ep-1", 3, "pol-1").sequence == 3
    with pytest.raises(PolicyNotHeldError, match="superseded by the desired sequence 3"):
        check_status_report(held(3), "ep-1", 2, "pol-1")
    with pytest.raises(PolicyNotHeldError, match="never issued"):
        check_status_report(held(3), "ep-1", 4, "pol-1")
    with pytest.raises(PolicyNotHeldError, match="has no policy"):
        check_status_report(None, "ep-1", 1, "pol-1")
    with pytest.raises(PolicyNotHeldError, match="policy_id"):
        check_status_report(held(3), "ep-1", 3, "pol-other")


def test_applied_needs_the_hash_and_failed_needs_a_reason() -> None:
    check_status_consistency("applied", "a" * 64, "")
    check_status_consistency("failed", None, "nft -f failed")
    with pytest.raises(StatusReportInvalidError, match="rules_sha256"):
        check_status_consistency("applied", None, "")
    with pytest.raises(StatusReportInvalidError, match="detail"):
        check_status_consistency("failed", None, "  ")


def test_gzip_is_sent_only_to_clients_that_accept_it() -> None:
    assert accepts_gzip("gzip, deflate") and accepts_gzip("br;q=1.0, *;q=0.5")
    assert accepts_gzip("GZIP;q=0.3")
    assert not accepts_gzip("") and not accepts_gzip("identity")
    assert not accepts_gzip("gzip;q=0") and not accepts_gzip("gzip;q=zero")
    stored = HeldPolicy("ep-1", "acct-1", "pol-1", 1, gzip.compress(b'{"a":1}'), gzipped=True)
    assert stored.signed_json == b'{"a":1}'
    assert stored.encoded_for("gzip") == (stored.body, "gzip")
    assert stored.encoded_for("identity") == (b'{"a":1}', None)
    small = HeldPolicy("ep-1", "acct-1", "pol-1", 1, b'{"a":1}')
    assert small.encoded_for("gzip") == (b'{"a":1}', None)
    # A long policy (many peers) is worth compressing on the way out; a short one is not.
    long_json = (
        b'{"peers":['
        + b",".join(b'{"name":"RMM","address":"203.0.113.%d"}' % i for i in range(60))
        + b"]}"
    )
    large = HeldPolicy("ep-1", "acct-1", "pol-1", 1, long_json)
    body, coding = large.encoded_for("gzip")
    assert coding == "gzip" and gzip.decompress(body) == long_json and len(body) < len(long_json)
    assert large.encoded_for("identity") == (long_json, None)
