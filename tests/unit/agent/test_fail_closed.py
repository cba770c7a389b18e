"""The agent fails closed (DESIGN.md §6, guarantee 11): verification, state and configuration.

Each test here failed before the fix of issue 10, finding 1 and the agent half of finding 7.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.bootstrap import AgentConfig, AgentConfigError, dev_mode_from_env, validate_config
from agent.client import (
    AgentRejectedError,
    EnforcerClient,
    Enrollment,
    PlainHttpRefusedError,
    StatusReport,
)
from agent.firewall import SimulatedFirewall
from agent.loop import AgentIdentity, AgentLoop, NoTrustedKeyError
from agent.state import StateCorruptError, StateStore
from agent.verification import (
    PinnedKey,
    PolicyRefusedError,
    SigningKeyError,
    parse_trusted_keys,
    verify_policy,
)
from shared.messages import SignedPolicy
from tests.unit.agent.policies import TestSigner, make_policy

FACTS = HostFacts(platform_addresses=(), dns_resolvers=("192.0.2.53",))


@pytest.fixture(scope="module")
def signer() -> TestSigner:
    return TestSigner()


# --- verification -----------------------------------------------------------------------------


def test_genuine_policy_of_another_account_is_refused(signer: TestSigner) -> None:
    signed = signer.sign(make_policy(endpoint_id="ep-1", account_id="acct-2", mode="none"))
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            signed,
            key=PinnedKey.from_base64(signer.public_b64),
            account_id="acct-1",
            endpoint_id="ep-1",
            last_applied_sequence=0,
        )
    assert refused.value.kind == "account" and "acct-2" in refused.value.reason


def test_genuine_policy_of_another_endpoint_of_our_account_is_refused(signer: TestSigner) -> None:
    signed = signer.sign(make_policy(endpoint_id="ep-2", mode="none"))
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            signed,
            key=PinnedKey.from_base64(signer.public_b64),
            account_id="acct-1",
            endpoint_id="ep-1",
            last_applied_sequence=0,
        )
    assert refused.value.kind == "endpoint"


def test_configured_next_key_verifies_and_an_unlisted_key_does_not(signer: TestSigner) -> None:
    current, unlisted = TestSigner(), TestSigner()
    keys = parse_trusted_keys(f"{current.public_b64}, {signer.public_b64}")
    assert [k.key_id for k in keys] == [current.key_id, signer.key_id]
    for trusted in (current, signer):
        verify_policy(
            trusted.sign(make_policy()),
            key=keys,
            account_id="acct-1",
            endpoint_id="ep-1",
            last_applied_sequence=0,
        )
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            unlisted.sign(make_policy()),
            key=keys,
            account_id="acct-1",
            endpoint_id="ep-1",
            last_applied_sequence=0,
        )
    assert refused.value.kind == "key"


def test_more_than_two_configured_keys_is_a_configuration_error() -> None:
    three = ",".join(TestSigner().public_b64 for _ in range(3))
    with pytest.raises(SigningKeyError, match="at most 2"):
        parse_trusted_keys(three)


# --- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{}", b"", b'{"agent_id": "ep-1", "poll', b"\xff\xfe"])
def test_corrupt_or_emptied_state_file_is_an_error_not_a_fresh_start(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "agent-state.json").write_bytes(content)
    with pytest.raises(StateCorruptError, match="rules in force"):
        StateStore(tmp_path).load()


def test_fence_cannot_be_edited_below_the_stored_policy(tmp_path: Path, signer: TestSigner) -> None:
    store = StateStore(tmp_path)
    state = store.load()
    state.agent_id, state.agent_token = "ep-1", "tok"
    state.last_policy = signer.sign(make_policy(sequence=9))
    store.save(state)  # every counter left at 0, as an edit down would
    assert store.load().fence == 9


class ScriptedClient(EnforcerClient):
    """An in-memory enforcer: answers polls from a script, records enrollments and key fetches."""

    def __init__(self, key_b64: str) -> None:
        super().__init__("http://enforcer.test", httpx.AsyncClient(), allow_plain_http=True)
        self.key_b64 = key_b64
        self.key_fetches = 0
        self.enrollments: list[str | None] = []
        self.answer_id: str | None = None
        self.polls: list[SignedPolicy | int | None] = []
        self.reports: list[StatusReport] = []
        self.polled = asyncio.Event()

    async def signing_key(self) -> str:
        self.key_fetches += 1
        return self.key_b64

    async def enroll(
        self,
        *,
        account_id: str,
        enrollment_key: str,
        hostname: str,
        platform: str,
        endpoint_id: str | None = None,
    ) -> Enrollment:
        self.enrollments.append(endpoint_id)
        agent_id = self.answer_id or endpoint_id or "ep-1"
        return Enrollment(agent_id, f"tok-{len(self.enrollments)}")

    async def poll_policy(
        self, enrollment: Enrollment, *, after: int, wait: float
    ) -> SignedPolicy | None:
        await asyncio.sleep(0.001)
        answer = self.polls.pop(0) if self.polls else None
        if not self.polls:
            self.polled.set()
        if isinstance(answer, int):
            raise AgentRejectedError(f"poll: HTTP {answer}", answer)
        return answer

    async def report(self, enrollment: Enrollment, report: StatusReport) -> None:
        self.reports.append(report)


def _loop(tmp_path: Path, client: ScriptedClient, stats: AgentStats | None = None) -> AgentLoop:
    async def key() -> str:
        return "k"

    return AgentLoop(
        identity=AgentIdentity("acct-1", "web-01", "linux"),
        client=client,
        store=StateStore(tmp_path, durable=False),
        firewall=SimulatedFirewall(FACTS, "hostiso"),
        enrollment_key=key,
        stats=stats or AgentStats(),
        dev_mode=True,
        poll_wait=1,
        table_check_interval=None,
        backoff_cap=0.01,
        reenroll_after=2,
    )


async def _run_until_script_done(agent: AgentLoop, client: ScriptedClient) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(client.polled.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_fence_and_pinned_key_survive_reenrollment_and_restart(
    tmp_path: Path, signer: TestSigner
) -> None:
    client = ScriptedClient(signer.public_b64)
    agent = _loop(tmp_path, client)
    client.polls = [signer.sign(make_policy(sequence=7, mode="strict")), 401, 401, None]
    await _run_until_script_done(agent, client)
    assert client.enrollments == [None, "ep-1"]  # the re-enrollment names our endpoint
    assert client.key_fetches == 1  # pinned once, at the first enrollment
    assert agent.stats.reenrollments == 1 and agent.stats.rejected == 2

    attacker = TestSigner()
    restarted_client = ScriptedClient(attacker.public_b64)
    restarted = _loop(tmp_path, restarted_client)
    restarted_client.polls = [
        signer.sign(make_policy(sequence=6, mode="none")),  # genuine but older: replay
        attacker.sign(make_policy(sequence=8, mode="none")),
        None,
    ]
    await _run_until_script_done(restarted, restarted_client)
    assert restarted_client.key_fetches == 0
    stored = StateStore(tmp_path).load()
    assert (stored.signing_key, stored.fence, stored.agent_id) == (signer.public_b64, 7, "ep-1")
    assert stored.last_policy is not None and stored.last_policy.policy.mode == "strict"
    assert restarted.stats.by_refusal == {"sequence": 1, "key": 1}
    assert [r.status for r in restarted_client.reports] == ["failed", "failed"]


async def test_enrollment_answer_naming_another_endpoint_is_refused(
    tmp_path: Path, signer: TestSigner
) -> None:
    client = ScriptedClient(signer.public_b64)
    agent = _loop(tmp_path, client)
    client.polls = [signer.sign(make_policy(sequence=3, mode="strict")), 401, 401, None]
    await _run_until_script_done(agent, client)
    client.answer_id = "ep-of-acct-2"
    client.polled.clear()
    client.polls = [401, 401, signer.sign(make_policy(endpoint_id="ep-of-acct-2", sequence=9))]
    client.polls.append(None)
    await _run_until_script_done(agent, client)
    assert agent.stats.identity_mismatch == 1
    stored = StateStore(tmp_path).load()
    assert (stored.agent_id, stored.fence) == ("ep-1", 3)
    assert stored.agent_token == "tok-2"  # still the token of our own endpoint
    assert agent.stats.by_refusal == {"endpoint": 1}


async def test_without_a_configured_key_outside_dev_mode_nothing_is_fetched(
    tmp_path: Path, signer: TestSigner
) -> None:
    client = ScriptedClient(signer.public_b64)
    agent = _loop(tmp_path, client)
    agent.dev_mode = False
    with pytest.raises(NoTrustedKeyError):
        await agent.run(asyncio.Event())
    assert client.key_fetches == 0 and client.enrollments == []


async def test_enrollment_key_never_goes_over_plain_http_outside_dev_mode() -> None:
    async with httpx.AsyncClient() as http:
        client = EnforcerClient("http://127.0.0.1:9", http)
        with pytest.raises(PlainHttpRefusedError):
            await client.enroll(account_id="a", enrollment_key="k", hostname="h", platform="linux")


# --- configuration ----------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "enrollment.key"
    path.write_text("e" * 64 + "\n")
    path.chmod(0o600)
    yield path


def _config(tmp_path: Path, key_file: Path, **changes: object) -> AgentConfig:
    base = AgentConfig(
        enforcer_url="https://enforcer.test:8003",
        account_id="acct-1",
        state_dir=tmp_path,
        hostname="h",
        enrollment_key_file=key_file,
        signing_public_key=TestSigner().public_b64,
        facts=FACTS,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_production_configuration_is_accepted(tmp_path: Path, key_file: Path) -> None:
    validate_config(_config(tmp_path, key_file))
    validate_config(
        _config(tmp_path, key_file, enrollment_key_file=None, enrollment_key_env="e" * 64)
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"enrollment_key_file": None, "enrollment_key": "k"}, "refused outside dev mode"),
        ({"enforcer_url": "http://enforcer.test:8003"}, "plain http:// is refused"),
        ({"signing_public_key": None}, "required outside dev mode"),
        ({"enrollment_key_file": None}, "give the enrollment key"),
        ({"enrollment_key_env": "k"}, "give the enrollment key once"),
        ({"ca_file": Path("/nonexistent/ca.pem")}, "--ca-file"),
    ],
)
def test_unsafe_configuration_is_refused_outside_dev_mode(
    tmp_path: Path, key_file: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(AgentConfigError, match=message):
        validate_config(_config(tmp_path, key_file, **changes))


def test_dev_mode_allows_argv_key_plain_http_and_pinning(tmp_path: Path, key_file: Path) -> None:
    validate_config(
        _config(
            tmp_path,
            key_file,
            dev=True,
            enrollment_key_file=None,
            enrollment_key="k",
            enforcer_url="http://127.0.0.1:8003",
            signing_public_key=None,
        )
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_enrollment_key_file_readable_by_group_or_other_is_refused(
    tmp_path: Path, key_file: Path, mode: int
) -> None:
    key_file.chmod(mode)
    with pytest.raises(AgentConfigError, match="group or other") as refused:
        validate_config(_config(tmp_path, key_file))
    assert str(key_file) in str(refused.value)
    validate_config(_config(tmp_path, key_file, dev=True))


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_dev_mode_comes_from_hostiso_dev(value: str, expected: bool) -> None:
    assert dev_mode_from_env({"HOSTISO_DEV": value}) is expected
    assert dev_mode_from_env({}) is False


class RejectingReports(ScriptedClient):
    """Answers the first ``rejections`` status reports with 401, then accepts them."""

    def __init__(self, key_b64: str, rejections: int) -> None:
        super().__init__(key_b64)
        self.rejections = rejections

    async def report(self, enrollment: Enrollment, report: StatusReport) -> None:
        if self.rejections > 0:
            self.rejections -= 1
            raise AgentRejectedError("report: HTTP 401", 401)
        await super().report(enrollment, report)


async def test_rejected_report_stays_pending_and_goes_after_the_next_good_poll(
    tmp_path: Path, signer: TestSigner
) -> None:
    client = RejectingReports(signer.public_b64, rejections=1)
    agent = _loop(tmp_path, client)
    client.polls = [signer.sign(make_policy(sequence=4, mode="strict")), None, None]
    await _run_until_script_done(agent, client)
    assert [(r.sequence, r.status) for r in client.reports] == [(4, "applied")]
    assert agent.stats.rejected == 1
    assert StateStore(tmp_path).load().pending_report is None


def test_make_run_dev_tls_is_made_once_and_names_the_enforcer_address(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    from shared.devstack import dev_tls

    ca, enforcer = dev_tls(tmp_path)
    first = enforcer.cert.read_bytes()
    assert dev_tls(tmp_path) == (ca, enforcer) and enforcer.cert.read_bytes() == first
    assert enforcer.key.stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(first)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    issuer = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert.verify_directly_issued_by(issuer)


async def test_reenrollment_without_a_readable_key_keeps_polling_as_the_same_endpoint(
    tmp_path: Path, signer: TestSigner
) -> None:
    client = ScriptedClient(signer.public_b64)
    agent = _loop(tmp_path, client)
    calls = 0

    async def key_then_gone() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise FileNotFoundError("enrollment.key")
        return "k"

    agent.enrollment_key = key_then_gone
    client.polls = [signer.sign(make_policy(sequence=2, mode="strict")), 401, 401, None]
    await _run_until_script_done(agent, client)
    assert client.enrollments == [None] and agent.stats.enrollment_refused == 1
    assert StateStore(tmp_path).load().fence == 2
