"""The agent's state directory: enrollment, the pinned signing key and the last verified policy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.messages import SignedPolicy


class StateCorruptError(Exception):
    """A state file exists but cannot be read back (truncated, edited, wrong format)."""


class AgentState(BaseModel):
    """Everything the agent must remember across restarts."""

    model_config = ConfigDict(extra="forbid")

    agent_id: str | None = None
    agent_token: str | None = None
    signing_key: str | None = Field(
        None, description="Base64 Ed25519 public key pinned once at the first enrollment (dev)."
    )
    last_applied_sequence: int = 0
    # The fence: the highest sequence whose signature, account and endpoint verified, applied
    # or not. Nothing at or below it is ever applied again, across restarts and re-enrollments.
    verified_sequence: int = 0
    # Polls ask for sequences above this; it moves past a verified policy that failed to apply
    # so the agent does not loop on it, while last_applied_sequence keeps fencing.
    poll_cursor: int = 0
    last_policy: SignedPolicy | None = None
    last_rules_sha256: str | None = None
    last_ruleset: str | None = None
    # A status report not yet accepted by the enforcer: resent at start, because the enforcer
    # will not hand us that sequence again once we poll past it.
    pending_report: dict[str, Any] | None = None

    @property
    def fence(self) -> int:
        """Highest verified sequence; a state file edited down cannot lower it below its policy."""
        stored = self.last_policy.policy.sequence if self.last_policy is not None else 0
        return max(self.verified_sequence, self.last_applied_sequence, self.poll_cursor, stored)

    def raise_fence(self, sequence: int) -> None:
        self.verified_sequence = max(self.fence, sequence)
        self.poll_cursor = max(self.poll_cursor, sequence)


class StateStore:
    """One JSON file in the state directory, replaced atomically (write, fsync if durable, rename)."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self.path = directory / "agent-state.json"
        # A real host must find its policy after a power loss (fsync). A simulated agent enforces
        # nothing, and thousands of them in one process would queue on the disk instead.
        self.durable = durable
        # A change only a non-durable store leaves for its next write (see ``persist_lazily``).
        self._unwritten: AgentState | None = None
        self._directory_made = False

    def load(self) -> AgentState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        try:
            state = AgentState.model_validate_json(raw)
        except ValidationError as exc:
            raise StateCorruptError(
                f"{self.path}: {exc.error_count()} invalid field(s); the agent stops and leaves"
                " the rules in force (fix or restore the file: starting afresh would forget the"
                " sequence fence)"
            ) from exc
        # Every write happens after enrollment: a file without the enrollment was truncated or
        # edited, and reading it as a fresh state would silently reset the fence to 0.
        if not state.agent_id or not state.agent_token:
            raise StateCorruptError(
                f"{self.path}: agent_id/agent_token missing; the agent stops and leaves the"
                " rules in force (fix or restore the file: starting afresh would forget the"
                " sequence fence)"
            )
        return state

    def save(self, state: AgentState) -> None:
        self._write(_dump(state))
        if self._unwritten is state:
            self._unwritten = None

    async def persist(self, state: AgentState) -> None:
        """``save`` without blocking the event loop on fsync (many agents share one loop).

        The snapshot is taken in the loop, so later changes to ``state`` cannot tear the write;
        each agent awaits its own writes, so they never overlap on one file.
        """
        data = _dump(state)
        if self._unwritten is state:
            self._unwritten = None
        if not self.durable:
            # Without fsync the write only reaches the page cache (tens of microseconds): a
            # thread hop would cost more than it saves, for every agent.
            self._write(data)
            return
        await asyncio.to_thread(self._write, data)

    async def persist_lazily(self, state: AgentState) -> None:
        """``persist`` for a change that only forgets finished work (a report the enforcer took).

        A durable store (a real host) writes it now. A non-durable one (simulated agents) keeps
        it for its next write or ``flush``: one write per policy instead of two. Losing it to a
        crash only sends that report again at start, which the enforcer takes as a redelivery
        (as it does when a real host crashes between the answer and this write).
        """
        if self.durable:
            await self.persist(state)
            return
        self._unwritten = state

    def flush(self) -> None:
        """Write what ``persist_lazily`` left unwritten (the agent is stopping)."""
        if self._unwritten is not None:
            self.save(self._unwritten)

    def _write(self, data: bytes) -> None:
        if self.durable:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write_durably(data)
            return
        if not self._directory_made:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._directory_made = True
        # Simulated agents: one temporary name per state directory is enough (each agent's
        # non-durable writes are synchronous, so two never interleave), and one write call;
        # the rename still keeps a torn file from ever being read back.
        tmp = self.directory / ".agent-state.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def _write_durably(self, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".agent-state.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _dump(state: AgentState) -> bytes:
    return state.model_dump_json(indent=1).encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
