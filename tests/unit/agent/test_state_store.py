"""The state file: owner-only, replaced whole, and written once per policy by simulated agents."""

import stat
from pathlib import Path

import pytest

from agent.state import AgentState, StateStore

REPORT = {"sequence": 3, "policy_id": "pol-3", "status": "applied", "rules_sha256": None}


def _enrolled() -> AgentState:
    return AgentState(agent_id="ep-1", agent_token="tok-1", pending_report=dict(REPORT))


@pytest.mark.parametrize("durable", [True, False])
async def test_state_file_is_owner_only_and_nothing_temporary_is_left(
    tmp_path: Path, durable: bool
) -> None:
    store = StateStore(tmp_path / "state", durable=durable)
    state = _enrolled()
    for sequence in (1, 2):
        state.last_applied_sequence = sequence
        await store.persist(state)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [p.name for p in store.directory.iterdir()] == ["agent-state.json"]
    assert store.load().last_applied_sequence == 2


async def test_a_durable_store_writes_a_sent_report_away_at_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path, durable=True)
    state = _enrolled()
    await store.persist(state)
    state.pending_report = None
    await store.persist_lazily(state)
    assert store.load().pending_report is None


async def test_a_simulated_store_forgets_a_sent_report_with_its_next_write(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path, durable=False)
    state = _enrolled()
    await store.persist(state)
    state.pending_report = None
    await store.persist_lazily(state)
    # A crash here would only send that report again at start (the enforcer takes redeliveries).
    assert store.load().pending_report == REPORT
    state.last_applied_sequence = 4
    await store.persist(state)
    assert store.load().pending_report is None
    assert store.load().last_applied_sequence == 4


async def test_a_simulated_store_writes_what_it_deferred_when_flushed(tmp_path: Path) -> None:
    store = StateStore(tmp_path, durable=False)
    state = _enrolled()
    await store.persist(state)
    state.pending_report = None
    await store.persist_lazily(state)
    store.flush()
    assert store.load().pending_report is None
    # Nothing left to write: a second flush does not touch the file.
    written = store.path.stat().st_mtime_ns
    store.flush()
    assert store.path.stat().st_mtime_ns == written
