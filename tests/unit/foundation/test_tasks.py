"""Loops stop when cancelled even if a library swallowed the cancel; shutdown never hangs."""

from __future__ import annotations

import asyncio
import contextlib

from shared.tasks import cancel_and_wait, raise_if_cancelling


async def _loop_whose_library_swallows_cancels() -> None:
    while True:
        # What a racing wait_for or redis-py can do on Python 3.11: the cancel is swallowed.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.01)
        raise_if_cancelling()


async def test_a_swallowed_cancel_still_ends_the_loop() -> None:
    task = asyncio.create_task(_loop_whose_library_swallows_cancels())
    await asyncio.sleep(0.02)
    await cancel_and_wait([task], timeout=5)
    assert task.cancelled()


async def test_cancel_and_wait_gives_up_on_a_task_that_never_stops() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.wait_for(cancel_and_wait([task], timeout=0.2), 5)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
