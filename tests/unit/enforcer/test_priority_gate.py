"""The normal command lane gives way while the priority lane holds a batch."""

from __future__ import annotations

import asyncio

from services.enforcer.consumers import PriorityGate


async def test_normal_lane_waits_until_every_priority_batch_is_done() -> None:
    gate = PriorityGate()
    await asyncio.wait_for(gate.wait_idle(), 1)  # idle at start: the normal lane runs freely
    gate.enter()
    gate.enter()
    waiting = asyncio.create_task(gate.wait_idle())
    await asyncio.sleep(0)  # let the waiter block
    gate.leave()
    await asyncio.sleep(0)
    assert not waiting.done(), "released while a priority batch was still in hand"
    gate.leave()
    await asyncio.wait_for(waiting, 1)
