"""The agent's apply step, run inside the ``host`` namespace: verify, apply with nftables, persist.

Prints the status report the agent would send, as JSON. ``--reapply`` does what the agent does
at start instead: put the last verified policy from the state dir back in force.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from agent.addresses import HostFacts
from agent.applier import AgentStats, PolicyApplier
from agent.bootstrap import read_resolvers
from agent.firewall import NftablesFirewall, Probe
from agent.state import StateStore
from agent.verification import PinnedKey
from shared.messages import SignedPolicy


async def _run(args: argparse.Namespace, signed: SignedPolicy | None) -> dict[str, object]:
    store = StateStore(Path(args.state_dir))
    state = store.load()
    state.agent_id, state.agent_token = args.endpoint_id, "tok-netns"
    # --resolv-conf: what the agent does without --dns-resolvers (inside `ip netns exec`, the
    # namespace's /etc/netns/NS/resolv.conf is mounted over /etc/resolv.conf).
    resolvers = read_resolvers() if args.resolv_conf else tuple(args.resolver)
    firewall = NftablesFirewall(
        HostFacts(platform_addresses=(), dns_resolvers=resolvers),
        args.table,
        platform_probe=Probe.parse(args.platform_probe),
        negative_probe=Probe.parse(args.negative_probe) if args.negative_probe else None,
    )
    applier = PolicyApplier(
        store,
        state,
        firewall,
        PinnedKey.from_base64(args.public_key),
        AgentStats(),
        account_id=args.account_id,
    )
    if args.reapply:
        await applier.reapply_last()
        return {"reapplied": state.last_applied_sequence}
    assert signed is not None, "--policy-file is required unless --reapply"
    decision = await applier.receive(signed)
    return {"refused": decision.refused, **decision.report.to_json()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--endpoint-id", required=True)
    parser.add_argument("--account-id", default="acct-1")
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--table", default="hostiso")
    parser.add_argument("--platform-probe", required=True)
    parser.add_argument("--negative-probe")
    parser.add_argument("--resolver", action="append", default=[])
    parser.add_argument("--resolv-conf", action="store_true")
    parser.add_argument("--policy-file")
    parser.add_argument("--reapply", action="store_true")
    args = parser.parse_args()
    signed = (
        SignedPolicy.model_validate_json(Path(args.policy_file).read_bytes())
        if args.policy_file
        else None
    )
    print(json.dumps(asyncio.run(_run(args, signed))), flush=True)


if __name__ == "__main__":
    main()
