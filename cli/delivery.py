"""When is an isolation request done? Pure rules the ``watch`` command polls against."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

SETTLED_STATES = frozenset({"isolated", "not_isolated"})


class Outcome(StrEnum):
    """Where one endpoint stands against what the operator is waiting for."""

    DONE = "done"
    FAILED = "failed"
    WAITING = "waiting"


@dataclass(frozen=True)
class Target:
    """What the endpoint should reach: a state and, for isolation, the acceptable modes.

    ``after_sequence`` is the endpoint's desired sequence before the request: requests travel
    through Kafka, so right after the 202 the endpoint may still show its previous, settled
    policy, and a ``failed`` at or below that sequence belongs to an earlier request.
    """

    state: str | None = None
    modes: frozenset[str] = frozenset()
    after_sequence: int = 0


ANY_SETTLED = Target()


def isolate_target(mode: str, after_sequence: int) -> Target:
    # Strict wins: a standard request on a strictly isolated endpoint leaves it strict.
    modes = frozenset({"strict"}) if mode == "strict" else frozenset({"standard", "strict"})
    return Target(state="isolated", modes=modes, after_sequence=after_sequence)


def release_target(after_sequence: int) -> Target:
    return Target(state="not_isolated", after_sequence=after_sequence)


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def outcome(isolation: dict[str, Any], target: Target) -> Outcome:
    """DONE when the agent applied what the target asks for, FAILED when it reported failure."""
    state = isolation.get("state")
    desired = _int(isolation.get("desired_sequence"))
    applied = _int(isolation.get("applied_sequence"))
    if state == "failed" and desired > target.after_sequence:
        return Outcome.FAILED
    if state == "failed" and target.state is None:
        return Outcome.FAILED
    if state not in SETTLED_STATES or applied < desired:
        return Outcome.WAITING
    if target.state is not None and state != target.state:
        return Outcome.WAITING
    if target.modes and isolation.get("mode") not in target.modes:
        return Outcome.WAITING
    return Outcome.DONE


@dataclass(frozen=True)
class Progress:
    """How many of the watched endpoints are done, failed or still waiting."""

    done: int
    failed: int
    waiting: int

    @property
    def total(self) -> int:
        return self.done + self.failed + self.waiting

    @property
    def finished(self) -> bool:
        return self.waiting == 0


def tally(outcomes: list[Outcome]) -> Progress:
    return Progress(
        done=outcomes.count(Outcome.DONE),
        failed=outcomes.count(Outcome.FAILED),
        waiting=outcomes.count(Outcome.WAITING),
    )
