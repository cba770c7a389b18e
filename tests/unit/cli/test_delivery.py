"""When `watch` counts an endpoint as done, failed or still waiting."""

from __future__ import annotations

from typing import Any

from cli.delivery import ANY_SETTLED, Outcome, isolate_target, outcome, release_target, tally


def iso(state: str, mode: str | None, desired: int, applied: int) -> dict[str, Any]:
    return {"state": state, "mode": mode, "desired_sequence": desired, "applied_sequence": applied}


def test_settled_and_applied_is_done_for_a_plain_watch() -> None:
    assert outcome(iso("isolated", "standard", 3, 3), ANY_SETTLED) is Outcome.DONE
    assert outcome(iso("not_isolated", None, 4, 4), ANY_SETTLED) is Outcome.DONE


def test_pending_or_unapplied_is_waiting() -> None:
    assert outcome(iso("isolation_pending", "strict", 3, 2), ANY_SETTLED) is Outcome.WAITING
    assert outcome(iso("release_pending", None, 3, 2), ANY_SETTLED) is Outcome.WAITING
    assert outcome(iso("isolated", "strict", 3, 2), ANY_SETTLED) is Outcome.WAITING


def test_the_previous_settled_policy_does_not_count_for_a_strict_request() -> None:
    target = isolate_target("strict", after_sequence=1)
    assert outcome(iso("isolated", "standard", 1, 1), target) is Outcome.WAITING
    assert outcome(iso("isolated", "strict", 2, 2), target) is Outcome.DONE


def test_a_standard_request_on_a_strict_endpoint_is_done_because_strict_wins() -> None:
    assert outcome(iso("isolated", "strict", 2, 2), isolate_target("standard", 2)) is Outcome.DONE


def test_release_waits_for_not_isolated() -> None:
    target = release_target(after_sequence=2)
    assert outcome(iso("isolated", "standard", 2, 2), target) is Outcome.WAITING
    assert outcome(iso("not_isolated", None, 3, 3), target) is Outcome.DONE


def test_only_a_failure_of_a_newer_sequence_fails_the_request() -> None:
    target = isolate_target("standard", after_sequence=2)
    assert outcome(iso("failed", "standard", 2, 1), target) is Outcome.WAITING
    assert outcome(iso("failed", "standard", 3, 2), target) is Outcome.FAILED
    assert outcome(iso("failed", "standard", 2, 1), ANY_SETTLED) is Outcome.FAILED


def test_an_unknown_answer_keeps_waiting() -> None:
    assert outcome({}, isolate_target("standard", 0)) is Outcome.WAITING


def test_tally_counts_and_knows_when_finished() -> None:
    progress = tally([Outcome.DONE, Outcome.FAILED, Outcome.WAITING, Outcome.DONE])
    assert (progress.done, progress.failed, progress.waiting, progress.total) == (2, 1, 1, 4)
    assert not progress.finished
    assert tally([Outcome.DONE, Outcome.FAILED]).finished
