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
    """One JSON file in the state directory, replaced atomically (write, fsync, rename)."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self.path = directory / "agent-state.json"
        # A real host must find its policy after a power loss (fsync). A simulated agent enforces
        # nothing, and thousands of them in one process would queue on the disk instead.
        self.durable = durable

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
        self._write(state.model_dump_json(indent=1).encode())

    async def persist(self, state: AgentState) -> None:
        """``save`` without blocking the event loop on fsync (many agents share one loop).

        The snapshot is taken in the loop, so later changes to ``state`` cannot tear the write;
        each agent awaits its own writes, so they never overlap on one file.
        """
        data = state.model_dump_json(indent=1).encode()
        if not self.durable:
            # Without fsync the write only reaches the page cache (tens of microseconds): a
            # thread hop would cost more than it saves, twice per policy for every agent.
            self._write(data)
            return
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".agent-state.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if self.durable:
                    os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
