"""Property: no address any boundary accepts can make ``nft -c -f`` refuse the agent's ruleset.

The boundaries are resolv.conf (the agent), ``HOSTISO_PLATFORM_ADDRESSES`` (config), the policy
model (``platform``, ``allowed_outbound[].address``) and the settings service's guardrails.
Whatever each accepts is rendered together and checked by the real ``nft`` in a throwaway
network namespace, so the host's own ruleset is never touched.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.addresses import HostFacts, parse_resolv_conf
from agent.nft import render_ruleset
from agent.windows import render_windows_script
from services.settings import domain
from shared.config import ServiceSettings
from shared.messages import AllowedPeer, FrozenPolicy
from tests.netns import requires_netns, run
from tests.unit.agent.policies import ISSUED

ODD = [
    "fe80::1%eth0",
    "fe80::1%1",
    "fe80::1",
    "::ffff:192.0.2.1",
    "::192.0.2.1",
    "64:ff9b::192.0.2.1",
    "2002:c000:201::1",
    "2001::1",
    "0.0.0.0",
    "::",
    "::1",
    "127.0.0.53",
    "255.255.255.255",
    "224.0.0.251",
    "ff02::fb",
    "169.254.169.254",
    "100.64.0.1",
    "192.0.0.8",
    "198.18.0.1",
    "192.88.99.1",
    "192.0.2.54x",
    "010.0.0.1",
    "10.1",
    "0x7f.0.0.1",
    "192.0.2.0/24",
    "192.0.2.1/24",
    "192.0.2.0/255.255.255.0",
    "2001:db8::/64",
    "2001:db8::/32",
    "fe80::/64",
    "1.2.3.4; flush ruleset",
    "1.2.3.4 }",
    "resolver.example",
]


def _prefix(pair: tuple[str, int]) -> str:
    return f"{pair[0]}/{pair[1]}"


CANDIDATES = st.one_of(
    st.sampled_from(ODD),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"{a}%eth0"),
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(16, 33)).map(_prefix),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(48, 129)).map(_prefix),
    st.text(alphabet="0123456789abcdef.:/%x ", max_size=24),
)


def _accepted(check: object, values: list[str]) -> list[str]:
    kept = []
    for value in values:
        try:
            check(value)  # type: ignore[operator]
        except (ValueError, ValidationError, domain.EntryRejectedError):
            continue
        kept.append(value)
    return kept


def _config_accepts(value: str) -> None:
    ServiceSettings(platform_addresses=[value])


def _peer_accepts(value: str) -> None:
    AllowedPeer(name="peer", address=value)


@pytest.fixture(scope="module")
def check_namespace() -> Iterator[str]:
    name = f"hi-chk-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def _nft_check(namespace: str, ruleset: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "-c", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        timeout=30,
    )


@requires_netns
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    resolvers=st.lists(CANDIDATES, max_size=5),
    platform=st.lists(CANDIDATES, max_size=4),
    peers=st.lists(CANDIDATES, max_size=6),
    standard=st.booleans(),
)
def test_nothing_a_boundary_accepts_makes_nft_refuse_the_ruleset(
    check_namespace: str,
    resolvers: list[str],
    platform: list[str],
    peers: list[str],
    standard: bool,
) -> None:
    resolv_conf = "".join(f"nameserver {value}\n" for value in resolvers)
    host_resolvers = parse_resolv_conf(resolv_conf)
    config_platform = _accepted(_config_accepts, platform)
    settings_peers = _accepted(domain.validate_address, peers)
    model_peers = _accepted(_peer_accepts, peers)
    # What config and settings accept goes into a policy unchanged, so the model must take it.
    assert set(settings_peers) <= set(model_peers)
    assert set(config_platform) <= set(_accepted(_peer_accepts, platform))
    policy = FrozenPolicy(
        policy_id="prop",
        endpoint_id="ep-prop",
        account_id="acct-prop",
        sequence=1,
        mode="standard" if standard else "strict",
        allowed_outbound=tuple(AllowedPeer(name="p", address=a) for a in model_peers)
        if standard
        else (),
        platform=tuple(_accepted(_peer_accepts, platform)),
        settings_version=1,
        issued_at=ISSUED,
        issued_by="prop",
    )
    facts = HostFacts(platform_addresses=tuple(config_platform), dns_resolvers=host_resolvers)
    ruleset = render_ruleset(policy, facts, "hostiso")
    render_windows_script(policy, facts)
    checked = _nft_check(check_namespace, ruleset)
    assert checked.returncode == 0, f"{checked.stderr}\n{ruleset}"


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("fe80::1%eth0", "zone_id"),
        ("0.0.0.0", "unspecified"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:198.51.100.1", "ipv4_mapped"),
        ("198.51.100.0/24", "prefix"),
        ("platform.example", "not_ip"),
    ],
)
def test_platform_addresses_config_refuses_what_no_ruleset_can_name(
    monkeypatch: pytest.MonkeyPatch, value: str, rule: str
) -> None:
    monkeypatch.setenv("HOSTISO_PLATFORM_ADDRESSES", f"198.51.100.1,{value}")
    with pytest.raises(ValidationError) as refused:
        ServiceSettings()
    message = str(refused.value)
    assert "HOSTISO_PLATFORM_ADDRESSES" in message and f"(rule: {rule})" in message
    assert repr(value) in message


def test_platform_addresses_config_takes_ipv4_and_ipv6_unicast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTISO_PLATFORM_ADDRESSES", "198.51.100.1, 2001:db8::1,127.0.0.1")
    assert ServiceSettings().platform_addresses == ["198.51.100.1", "2001:db8::1", "127.0.0.1"]
