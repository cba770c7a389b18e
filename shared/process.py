"""Process-wide tuning every process of the system applies: its event loop and its GC."""

from __future__ import annotations

import asyncio
import gc
import logging

# Young collections every 20,000 container allocations instead of 700: a request's objects
# (scope, tasks, frames, models) mostly die with it, by reference count, before the next
# collection instead of being traced and promoted; see settle_heap().
GC_THRESHOLDS = (20_000, 20, 10)


def install_fast_event_loop() -> str:
    """Make ``asyncio.run`` use uvloop (libuv) in this process; call before the loop starts.

    Returns the loop's name; falls back to the default asyncio loop, logged, if uvloop does
    not import (a platform without wheels).
    """
    try:
        import uvloop
    except ImportError as exc:
        logging.getLogger(__name__).warning("uvloop unavailable (%s): default asyncio loop", exc)
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def settle_heap() -> None:
    """Process-wide GC tuning, once the process has started (idempotent).

    Everything alive after start-up (modules, FastAPI and pydantic schemas, clients: about
    100,000 objects in the enforcer) lives as long as the process: ``gc.freeze()`` takes it
    out of every later collection, which otherwise traces it all on each full collection.
    Measured with ``python -m services.enforcer.measure --cpu-cycles 10 [--cpu-idle-agents N]``.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
