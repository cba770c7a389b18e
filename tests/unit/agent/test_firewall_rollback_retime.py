"""A rollback reloads the stored ruleset with its element timeouts recomputed: an entry that
expired since is not re-opened, one still open keeps only its remaining time."""

from __future__ import annotations

import re
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.addresses import HostFacts
from agent.firewall import NftablesFirewall, Probe
from agent.nft import render_ruleset
from shared.messages import AllowedPeer
from tests.unit.agent.policies import make_policy

FAKE_NFT = """
import sys
if "-f" in sys.argv:
    with open(sys.argv[1], "a") as log:
        log.write(sys.stdin.read() + "\\n=====\\n")
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rollback_recomputes_timeouts_and_leaves_out_what_expired(tmp_path: Path) -> None:
    script, log = tmp_path / "nft.py", tmp_path / "loads.log"
    script.write_text(FAKE_NFT)
    facts = HostFacts(platform_addresses=("198.51.100.2",))
    firewall = NftablesFirewall(
        facts,
        "hostiso",
        platform_probe=Probe("127.0.0.1", _closed_port()),
        negative_probe=None,
        nft_command=(sys.executable, str(script), str(log)),
        positive_timeout=0.5,
    )
    now = datetime.now(UTC)
    stored_policy = make_policy(allowed=()).model_copy(
        update={
            "allowed_outbound": (
                AllowedPeer(
                    name="open", address="203.0.113.10", expires_at=now + timedelta(minutes=30)
                ),
                AllowedPeer(
                    name="gone", address="203.0.113.11", expires_at=now - timedelta(minutes=1)
                ),
            )
        }
    )
    # Stored an hour ago (the agent's state after a restart): 90 and 59 minutes left back then.
    firewall.restore_known(render_ruleset(stored_policy, facts, now=now - timedelta(hours=1)))
    outcome = await firewall.apply(make_policy(mode="strict", sequence=2), rollback_on_failure=True)
    assert outcome.status == "failed" and "rolled back" in outcome.detail
    rolled_back = log.read_text().split("\n=====\n")[-2]
    assert "203.0.113.11" not in rolled_back
    [seconds] = re.findall(r"203\.0\.113\.10 timeout ([0-9]+)s", rolled_back)
    assert 1790 <= int(seconds) <= 1800
