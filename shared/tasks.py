"""Task helpers for long-running loops that must stop when cancelled."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that was swallowed on the way here.

    On Python 3.11 ``asyncio.wait_for`` can turn a cancel that races its own timeout into a
    TimeoutError, and redis-py can do the same inside a command; a loop that then carries on
    would make shutdown wait for it forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: list[asyncio.Task[None]], *, timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout`` seconds (logged if they overrun)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.error("task %s did not stop within %.0fs of being cancelled", task.get_name(), timeout)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("task %s ended with %r", task.get_name(), task.exception())
