"""The isolation service's request lanes: key-concurrent consume loops of the shared engine."""

from __future__ import annotations

from shared.consume import FETCHED_AT, ConsumeLoop, KeyConcurrent, typed
from shared.kafka import Handler
from shared.runtime import Runtime

__all__ = ["FETCHED_AT", "MAX_IN_FLIGHT", "MAX_RECORDS", "add_lane"]

MAX_RECORDS = 1000
MAX_IN_FLIGHT = 256


def add_lane(
    runtime: Runtime,
    topic: str,
    *,
    group_id: str,
    handler: Handler,
    name: str,
    max_in_flight: int = MAX_IN_FLIGHT,
    transient: tuple[type[BaseException], ...] = (),
) -> ConsumeLoop:
    """Register a key-concurrent loop with the runtime (started and supervised by it).

    The record key is the ordering key (endpoint_id for endpoint requests, account_id for the
    account-wide strict): records of one key run in offset order, other keys side by side.
    Handlers absorb the repeats of a retried partition by request id.
    """
    return runtime.add_loop(
        topic,
        group_id=group_id,
        name=name,
        strategy=KeyConcurrent(typed(runtime.topics, handler), max_in_flight=max_in_flight),
        max_records=MAX_RECORDS,
        transient=transient,
    )
