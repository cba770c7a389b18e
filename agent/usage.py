"""Usage deltas: the kernel's counter totals become per-entry deltas to report (DESIGN §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.firewall import UsageReading

# The enforcer takes at most this many counters per report.
MAX_COUNTERS = 100


@dataclass
class _Pending:
    packets: int = 0
    bytes: int = 0
    last_seen: datetime | None = None


@dataclass
class UsageTracker:
    """Totals seen per counter and the deltas not yet reported, for one policy sequence.

    A new sequence starts from zero and drops what the previous one had not reported (the
    enforcer would refuse it with 409 anyway: counts of a superseded policy are never mixed
    into the new one). A new generation of the counting table (re-applied: the kernel's counts
    restarted) keeps the pending deltas and restarts the baseline at zero.
    """

    sequence: int = 0
    generation: int = -1
    baseline: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    keys: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)
    # True until the first report of a sequence went out: it names every entry, zeros included.
    fresh: bool = True

    def observe(self, reading: UsageReading, now: datetime | None = None) -> None:
        at = now if now is not None else datetime.now(UTC)
        if reading.sequence != self.sequence:
            self.sequence = reading.sequence
            self.pending = {}
            self.baseline = {}
            self.fresh = True
        if reading.generation != self.generation:
            self.generation = reading.generation
            self.baseline = {}
        self.keys = {e.name: (e.address, e.protocol, e.ports) for e in reading.entries}
        for name in self.keys:
            packets, size = reading.totals.get(name, (0, 0))
            old_packets, old_size = self.baseline.get(name, (0, 0))
            if packets < old_packets or size < old_size:
                old_packets, old_size = 0, 0  # the kernel's count restarted
            self.baseline[name] = (packets, size)
            pending = self.pending.setdefault(name, _Pending())
            if packets > old_packets:
                pending.packets += packets - old_packets
                pending.bytes += size - old_size
                pending.last_seen = at

    def body(self) -> dict[str, Any] | None:
        """The report to send (None when nothing changed since the last one)."""
        counters = [
            {
                "address": address,
                "ports": list(ports),
                "protocol": protocol,
                "packets": p.packets,
                "bytes": p.bytes,
                "last_seen": None if p.last_seen is None else p.last_seen.isoformat(),
            }
            for name, (address, protocol, ports) in self.keys.items()
            if (p := self.pending.get(name, _Pending())).packets or self.fresh
        ]
        if not counters and not self.fresh:
            return None
        return {"sequence": self.sequence, "counters": counters[:MAX_COUNTERS]}

    def sent(self, body: dict[str, Any]) -> None:
        """The enforcer took ``body``: its deltas are reported (what came since stays)."""
        if body["sequence"] != self.sequence:
            return
        self.fresh = False
        for item in body["counters"]:
            for name, key in self.keys.items():
                if key == (item["address"], item["protocol"], tuple(item["ports"])):
                    pending = self.pending.get(name)
                    if pending is not None:
                        pending.packets -= item["packets"]
                        pending.bytes -= item["bytes"]
