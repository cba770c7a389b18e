"""The agent channel over verified TLS, and the agent's refusals of unsafe configuration.

Real processes and sockets: the fake enforcer served by uvicorn over HTTPS with certificates
from shared/infra/certs.py, the agent run in-process (simulated) and as ``python -m agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.bootstrap import AgentConfig, agent_http_client, build_loops, run_agents, tls_context
from agent.loop import AgentStoppedError
from services.enforcer.config import EnforcerSettings
from shared.http import serve
from shared.infra.certs import CertPaths, issue_cert, make_ca
from shared.infra.proc import free_port
from tests.helpers import wait_for
from tests.integration.agent.fake_enforcer import FakeEnforcer
from tests.unit.agent.policies import TestSigner, make_policy

FACTS = HostFacts(platform_addresses=("198.51.100.9",), dns_resolvers=("192.0.2.53",))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertPaths, CertPaths, CertPaths]:
    """The CA the enforcer's certificate comes from, that certificate, and an unrelated CA."""
    base = tmp_path_factory.mktemp("pki")
    ca = make_ca(base / "ca")
    enforcer = issue_cert(ca, base / "enforcer", "enforcer")
    other = make_ca(base / "other", common_name="some other CA")
    return ca, enforcer, other


@pytest.fixture
async def tls_enforcer(pki: tuple[CertPaths, CertPaths, CertPaths]) -> AsyncIterator[FakeEnforcer]:
    fake = FakeEnforcer(TestSigner())
    fake.use_tls(pki[1].cert, pki[1].key)
    await fake.start()
    yield fake
    await fake.stop()


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "enrollment.key"
    path.write_text(FakeEnforcer.ENROLLMENT_KEY)
    path.chmod(0o600)
    return path


def _config(enforcer: FakeEnforcer, tmp_path: Path, ca_file: Path) -> AgentConfig:
    # Production settings: https, a configured key, the key in a 0600 file, no dev mode.
    return AgentConfig(
        enforcer_url=enforcer.url,
        account_id="acct-1",
        state_dir=tmp_path / "state",
        hostname="tls-host",
        enrollment_key_file=_key_file(tmp_path),
        signing_public_key=enforcer.signer.public_b64,
        ca_file=ca_file,
        facts=FACTS,
        simulated=True,
        poll_wait=2.0,
        backoff_cap=0.2,
    )


async def test_agent_enrolls_and_applies_over_tls_verified_against_its_ca(
    tls_enforcer: FakeEnforcer,
    tmp_path: Path,
    pki: tuple[CertPaths, CertPaths, CertPaths],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.bootstrap")
    stop = asyncio.Event()
    config = replace(_config(tls_enforcer, tmp_path, pki[0].cert), stats_interval=0.1)
    task = asyncio.create_task(run_agents(config, stop))
    try:
        await wait_for(lambda: tls_enforcer.tokens, message="enrollment over TLS")
        agent_id = next(iter(tls_enforcer.tokens))
        tls_enforcer.publish(
            agent_id, tls_enforcer.signer.sign(make_policy(endpoint_id=agent_id, sequence=1))
        )
        await wait_for(lambda: tls_enforcer.reports_for(agent_id), message="ack over TLS")
        # The counters reach the log while the agent runs, not only when it stops.
        await wait_for(
            lambda: [
                r
                for r in caplog.records
                if r.getMessage() == "agent stats" and r.__dict__["stats"]["applied"] == 1
            ],
            message="stats logged",
        )
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 10)
    assert stats.applied == 1


async def test_enforcer_certificate_from_another_ca_is_refused_and_the_key_never_sent(
    tls_enforcer: FakeEnforcer, tmp_path: Path, pki: tuple[CertPaths, CertPaths, CertPaths]
) -> None:
    config = _config(tls_enforcer, tmp_path, pki[2].cert)
    stats = AgentStats()
    async with agent_http_client(tls_context(config.ca_file)) as http:
        (agent,) = build_loops(config, http, stats)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            # Each attempt fails in the TLS handshake: counted and retried, never sent.
            await wait_for(lambda: stats.poll_errors >= 3, message="handshakes refused")
            assert not task.done(), "the agent keeps retrying; it does not give up or crash"
        finally:
            stop.set()
            with contextlib.suppress(AgentStoppedError):
                await asyncio.wait_for(task, 10)
    assert tls_enforcer.enrollments == []
    assert not (tmp_path / "state" / "agent-state.json").exists()


async def test_serve_runs_https_with_the_configured_certificate(
    pki: tuple[CertPaths, CertPaths, CertPaths],
) -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    port = free_port()
    server = asyncio.create_task(
        serve(app, "127.0.0.1", port, ssl_certfile=pki[1].cert, ssl_keyfile=pki[1].key)
    )
    try:
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=pki[0].cert)
        ) as https:

            async def answered() -> bool:
                with contextlib.suppress(httpx.ConnectError):
                    return (await https.get(f"https://127.0.0.1:{port}/ping")).status_code == 200
                return False

            await wait_for(answered, timeout=15, message="https answer")
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/ping", timeout=3)
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def test_enforcer_tls_settings_come_in_pairs(
    pki: tuple[CertPaths, CertPaths, CertPaths], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTISO_TLS_CERT_FILE", str(pki[1].cert))
    with pytest.raises(ValueError, match="give both or neither"):
        EnforcerSettings()
    monkeypatch.setenv("HOSTISO_TLS_KEY_FILE", str(pki[1].key))
    settings = EnforcerSettings()
    assert (settings.tls_cert_file, settings.tls_key_file) == (pki[1].cert, pki[1].key)


async def _agent_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if k != "HOSTISO_DEV"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--account-id", "acct-1",
        "--state-dir", str(tmp_path / "state"), "--dns-resolvers", "",
        "--signing-public-key", TestSigner().public_b64, *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--enrollment-key", "k"], "--enrollment-key on the command line"),
        (["--enforcer-url", "http://127.0.0.1:8003"], "plain http:// is refused"),
        (["--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent/ca.pem"),
    ],
)
async def test_cli_refuses_unsafe_options_outside_dev_mode(
    tmp_path: Path, args: list[str], message: str
) -> None:
    env = {"HOSTISO_AGENT_ENROLLMENT_KEY": "k"} if "--enrollment-key" not in args else {}
    code, err = await _agent_cli(tmp_path, *args, env=env)
    assert code == 2, err
    assert message in err, err


async def test_cli_refuses_a_group_readable_key_file(tmp_path: Path) -> None:
    key = _key_file(tmp_path)
    key.chmod(0o644)
    code, err = await _agent_cli(tmp_path, "--enrollment-key-file", str(key))
    assert code == 2 and "must not be accessible by group or other" in err, err


async def test_cli_stops_on_a_corrupt_state_file_and_leaves_it_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent-state.json").write_text(json.dumps({"poll_cursor": 0}))
    code, err = await _agent_cli(
        tmp_path, "--dev", "--enrollment-key", "k", "--enforcer-url", "http://127.0.0.1:9"
    )
    assert code == 1 and "rules in force" in err, err
    assert json.loads((state / "agent-state.json").read_text()) == {"poll_cursor": 0}


async def test_cli_has_no_settings_url_path_that_mints_a_service_token(tmp_path: Path) -> None:
    """Finding 7 (agent half): the agent never holds the platform's JWT secret."""
    code, err = await _agent_cli(
        tmp_path, "--settings-url", "http://127.0.0.1:9", env={"HOSTISO_JWT_SECRET": "x" * 40}
    )
    assert code == 2 and "No such option" in err, err
