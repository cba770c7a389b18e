"""Simulated agents render each distinct ruleset once per process, and it is the real renderer's text."""

from datetime import UTC, datetime, timedelta

import pytest

import agent.firewall
from agent.addresses import HostFacts
from agent.firewall import RenderCache, SimulatedFirewall
from agent.nft import render_ruleset, rules_sha256
from shared.messages import AllowedPeer, FrozenPolicy, PolicyMode
from tests.unit.agent.policies import make_policy

FACTS = HostFacts(platform_addresses=("127.0.0.1",), dns_resolvers=("192.0.2.53",))


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sequences of the policies ``render_ruleset`` was really called for."""
    calls: list[int] = []
    real = agent.firewall.render_ruleset

    def counting(policy: FrozenPolicy, facts: HostFacts, table: str = "hostiso") -> str:
        calls.append(policy.sequence)
        return real(policy, facts, table)

    monkeypatch.setattr(agent.firewall, "render_ruleset", counting)
    return calls


@pytest.mark.parametrize("mode", ["standard", "strict", "none"])
async def test_every_agent_gets_the_real_renderers_text_and_hash(
    mode: PolicyMode, renders: list[int]
) -> None:
    cache = RenderCache()
    for index in range(3):
        policy = make_policy(endpoint_id=f"ep-{index}", sequence=index + 1, mode=mode)
        outcome = await SimulatedFirewall(FACTS, "hostiso", renders=cache).apply(
            policy, rollback_on_failure=True
        )
        expected = render_ruleset(policy, FACTS, "hostiso")
        assert (outcome.status, outcome.ruleset) == ("applied", expected)
        assert outcome.rules_sha256 == rules_sha256(expected)
    assert renders == [1]


async def test_another_allowlist_platform_facts_or_table_is_rendered_anew(
    renders: list[int],
) -> None:
    cache = RenderCache()
    base = make_policy(sequence=1)
    other_facts = HostFacts(platform_addresses=("127.0.0.2",), dns_resolvers=())
    cases = [
        (base, FACTS, "hostiso"),
        (make_policy(sequence=2, allowed=("203.0.113.11",)), FACTS, "hostiso"),
        (make_policy(sequence=3, platform=("198.51.100.2",)), FACTS, "hostiso"),
        (make_policy(sequence=4), other_facts, "hostiso"),
        (make_policy(sequence=5), FACTS, "other"),
    ]
    for policy, facts, table in cases:
        outcome = await SimulatedFirewall(facts, table, renders=cache).apply(
            policy, rollback_on_failure=True
        )
        assert outcome.ruleset == render_ruleset(policy, facts, table)
    assert renders == [1, 2, 3, 4, 5]


async def test_a_policy_with_an_expiring_entry_is_rendered_at_each_apply(
    renders: list[int],
) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    policy = make_policy(sequence=7).model_copy(
        update={
            "allowed_outbound": (AllowedPeer(name="RMM", address="203.0.113.10", expires_at=soon),)
        }
    )
    firewall = SimulatedFirewall(FACTS, "hostiso", renders=RenderCache())
    for _ in range(2):
        outcome = await firewall.apply(policy, rollback_on_failure=True)
        assert outcome.status == "applied"
        assert outcome.ruleset is not None and "timeout" in outcome.ruleset
    assert renders == [7, 7]


async def test_unrenderable_host_facts_are_refused_every_time(renders: list[int]) -> None:
    firewall = SimulatedFirewall(
        HostFacts(platform_addresses=("fe80::1%eth0",)), "hostiso", renders=RenderCache()
    )
    for _ in range(2):
        outcome = await firewall.apply(make_policy(sequence=1), rollback_on_failure=True)
        assert (outcome.status, outcome.rules_in_force) == ("failed", False)
    assert renders == [1, 1]


async def test_the_cache_holds_at_most_its_size(renders: list[int]) -> None:
    firewall = SimulatedFirewall(FACTS, "hostiso", renders=RenderCache(size=1))
    first, second = make_policy(sequence=1), make_policy(sequence=2, allowed=("203.0.113.11",))
    for policy in (first, second, first):
        await firewall.apply(policy, rollback_on_failure=True)
    assert renders == [1, 2, 1]
