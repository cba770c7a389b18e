"""Task helpers for long-running loops that must stop when cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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


@dataclass
class Supervised:
    """One supervised task: whether it runs now, how often it was restarted, its last error."""

    name: str
    factory: Callable[[], Awaitable[None]]
    stalled: Callable[[], bool] | None = None
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def healthy(self) -> bool:
        return self.running and not (self.stalled is not None and self.stalled())


class Supervisor:
    """Runs long-lived tasks and restarts one that ends or crashes, with a growing backoff.

    A task that is down (between a crash and its restart) or reports itself stalled is not
    healthy: readiness reads ``healthy()``, so /ready says so instead of the instance silently
    doing nothing. A crash is logged with its traceback and counted (``restarts``).
    """

    def __init__(self, *, min_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        self._min = min_backoff_s
        self._max = max_backoff_s
        self.tasks: dict[str, Supervised] = {}

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        stalled: Callable[[], bool] | None = None,
    ) -> Supervised:
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already supervised")
        entry = Supervised(name, factory, stalled)
        entry.task = asyncio.create_task(self._keep(entry), name=name)
        self.tasks[name] = entry
        return entry

    async def _keep(self, entry: Supervised) -> None:
        delay = self._min
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            entry.running = True
            try:
                await entry.factory()
                entry.last_error = "returned"
                log.error("task %s returned; restarting it", entry.name)
            except asyncio.CancelledError:
                entry.running = False
                raise
            except Exception as exc:
                entry.last_error = repr(exc)
                log.error("task %s crashed; restarting it", entry.name, exc_info=True)
            entry.running = False
            entry.restarts += 1
            raise_if_cancelling()
            if loop.time() - started > 60:
                # It ran well for a while: this is a new failure, not the same one repeating.
                delay = self._min
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max)

    def healthy(self) -> dict[str, bool]:
        return {name: entry.healthy() for name, entry in self.tasks.items()}

    async def stop(self, *, timeout: float = 10.0) -> None:
        tasks = [e.task for e in self.tasks.values() if e.task is not None]
        await cancel_and_wait(tasks, timeout=timeout)
        self.tasks.clear()
