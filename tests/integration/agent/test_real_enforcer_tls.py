"""The real enforcer serves its agent API over HTTPS; a production-configured agent enrolls over it.

Production agent settings (no dev mode): https verified against the CA, the signing key
provisioned out of band (here read once from ``GET /v1/signing-key`` as an installer would),
the enrollment key in a 0600 file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from pathlib import Path

import httpx

from agent.addresses import HostFacts
from agent.bootstrap import AgentConfig, run_agents
from agent.state import StateStore
from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from shared.infra.certs import issue_cert, make_ca
from shared.infra.proc import free_port, spawn, stop
from shared.topics import Topics
from tests.helpers import SECURITY, wait_for


async def test_agent_enrolls_with_the_real_enforcer_over_verified_tls(
    service_env: dict[str, str], topics: Topics, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca")
    cert = issue_cert(ca, tmp_path / "enforcer", "enforcer")
    port = free_port()
    log = tmp_path / "enforcer.log"
    proc = spawn(
        [sys.executable, "-m", "services.enforcer"],
        log_path=log,
        env={
            **os.environ,
            **service_env,
            # The enforcer connects to Kafka and Redis as its own principal and Redis user.
            **SECURITY.service_env("enforcer", service_env),
            "HOSTISO_HTTP_PORT": str(port),
            "HOSTISO_TLS_CERT_FILE": str(cert.cert),
            "HOSTISO_TLS_KEY_FILE": str(cert.key),
        },
    )
    base = f"https://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca.cert)) as https:

            async def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(log.read_text(errors="replace")[-3000:])
                with contextlib.suppress(httpx.HTTPError):
                    return (await https.get(f"{base}/ready", timeout=2)).status_code == 200
                return False

            await wait_for(ready, timeout=90, interval=0.3, message="enforcer ready over https")
            signing_key = (await https.get(f"{base}/v1/signing-key")).json()["public_key"]
        async with httpx.AsyncClient() as plain:
            refused = False
            try:
                await plain.get(f"http://127.0.0.1:{port}/ready", timeout=3)
            except httpx.HTTPError:
                refused = True
            assert refused, "the agent API must not answer plain http when TLS is configured"

        key_file = tmp_path / "enrollment.key"
        key_file.write_text(enrollment_key(DEV_ENROLLMENT_SECRET, "acct-tls"))
        key_file.chmod(0o600)
        config = AgentConfig(
            enforcer_url=base,
            account_id="acct-tls",
            state_dir=tmp_path / "state",
            hostname="tls-host",
            enrollment_key_file=key_file,
            signing_public_key=signing_key,
            ca_file=ca.cert,
            facts=HostFacts(platform_addresses=("127.0.0.1",), dns_resolvers=()),
            simulated=True,
            poll_wait=2.0,
            backoff_cap=0.5,
        )
        stop_agent = asyncio.Event()
        task = asyncio.create_task(run_agents(config, stop_agent))
        try:
            store = StateStore(tmp_path / "state")
            agent_id = await wait_for(
                lambda: store.path.exists() and store.load().agent_id,
                timeout=30,
                message="enrolled over TLS",
            )
            assert str(agent_id)
        finally:
            stop_agent.set()
            stats = await asyncio.wait_for(task, 15)
        assert stats.rejected == 0 and stats.enrollment_refused == 0
    finally:
        stop(proc)
