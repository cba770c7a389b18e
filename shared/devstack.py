"""``make run``: a real local Kafka and Redis, the three services and simulated agents, until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from shared.auth import mint_token
from shared.config import ServiceSettings
from shared.infra import LocalKafka, LocalRedis
from shared.infra.certs import CertPaths, issue_cert, make_ca
from shared.infra.proc import spawn, stop
from shared.kafka import ensure_topics
from shared.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"settings": 8001, "isolation": 8002, "enforcer": 8003}
# The agent channel runs over TLS even in dev; the CLI and portal talk plain http to the others.
TLS_SERVICES = {"enforcer"}
DEMO_ACCOUNT = "acct-demo"


def dev_tls(directory: Path) -> tuple[CertPaths, CertPaths]:
    """A dev CA and the enforcer's certificate for 127.0.0.1/localhost, made once under ``.run/``."""
    ca = CertPaths(cert=directory / "ca.pem", key=directory / "ca-key.pem")
    enforcer = CertPaths(cert=directory / "enforcer.pem", key=directory / "enforcer-key.pem")
    if not all(p.exists() for p in (ca.cert, ca.key, enforcer.cert, enforcer.key)):
        ca = make_ca(directory)
        enforcer = issue_cert(ca, directory, "enforcer")
    return ca, enforcer


def _base_url(name: str, port: int) -> str:
    scheme = "https" if name in TLS_SERVICES else "http"
    return f"{scheme}://127.0.0.1:{port}"


def _wait_ready(
    name: str,
    port: int,
    proc: subprocess.Popen[bytes],
    log: Path,
    ca_file: Path,
    timeout: float = 90,
) -> None:
    deadline = time.monotonic() + timeout
    url = f"{_base_url(name, port)}/ready"
    tls = ssl.create_default_context(cafile=ca_file)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url, timeout=1, verify=tls).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} not ready after {timeout}s; see {log}")


def jwt_secret_in_force() -> str:
    """The secret the services verify tokens with: ``HOSTISO_JWT_SECRET`` if set, else the dev one.

    The services inherit this process's environment (in dev mode), so a token signed with
    anything else would get 401.
    """
    return ServiceSettings(dev=True).require_secret("jwt_secret")


def _provision_enrollment_key(
    enforcer_port: int, account_id: str, ca_file: Path, secret: str
) -> str:
    """A fresh enrollment key of ``account_id`` from the enforcer (revokes the previous run's)."""
    soc = mint_token(secret, sub="devstack", role="soc", ttl_s=300)
    response = httpx.post(
        f"{_base_url('enforcer', enforcer_port)}/v1/accounts/{account_id}/enrollment-keys",
        headers={"Authorization": f"Bearer {soc}"},
        timeout=10,
        verify=str(ca_file),
    )
    response.raise_for_status()
    return str(response.json()["enrollment_key"])


def main() -> int:
    logs = ROOT / ".run"
    logs.mkdir(exist_ok=True)
    ca, enforcer_cert = dev_tls(logs / "tls")
    # Before anything starts: a too-short HOSTISO_JWT_SECRET stops here with the services' rule.
    jwt_secret = jwt_secret_in_force()
    stopped = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    kafka = LocalKafka()
    redis = LocalRedis()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        kafka.start()
        print(f"kafka   {kafka.bootstrap} (ready in {time.monotonic() - t0:.1f}s)", flush=True)
        redis.start()
        print(f"redis   {redis.url}", flush=True)
        asyncio.run(ensure_topics(kafka.bootstrap, Topics("hostiso.")))
        env = dict(
            os.environ,
            HOSTISO_DEV="1",
            HOSTISO_KAFKA_BOOTSTRAP=kafka.bootstrap,
            HOSTISO_REDIS_URL=redis.url,
            HOSTISO_LOG_JSON="0",
        )
        started: dict[str, int] = {}
        for name, port in SERVICES.items():
            if not (ROOT / "services" / name / "__main__.py").exists():
                continue
            log = logs / f"{name}.log"
            service_env = dict(env, HOSTISO_HTTP_PORT=str(port), HOSTISO_INSTANCE_ID=name)
            if name in TLS_SERVICES:
                service_env.update(
                    HOSTISO_TLS_CERT_FILE=str(enforcer_cert.cert),
                    HOSTISO_TLS_KEY_FILE=str(enforcer_cert.key),
                )
            proc = spawn(
                [sys.executable, "-m", f"services.{name}"],
                log_path=log,
                cwd=ROOT,
                env=service_env,
            )
            procs.append(proc)
            started[name] = port
        for name, port in started.items():
            _wait_ready(name, port, procs[list(started).index(name)], logs / f"{name}.log", ca.cert)
            url = _base_url(name, port)
            print(f"{name:9} {url}  (OpenAPI: {url}/docs)", flush=True)
        if (ROOT / "agent" / "__main__.py").exists() and "enforcer" in started:
            log = logs / "agents.log"
            demo_key = _provision_enrollment_key(
                started["enforcer"], DEMO_ACCOUNT, ca.cert, jwt_secret
            )
            procs.append(
                spawn(
                    [
                        sys.executable,
                        "-m",
                        "agent",
                        "--simulated",
                        "--count",
                        "3",
                        "--account-id",
                        DEMO_ACCOUNT,
                        "--enforcer-url",
                        _base_url("enforcer", started["enforcer"]),
                        "--ca-file",
                        str(ca.cert),
                        "--state-dir",
                        str(logs / "agents"),
                        "--hostname",
                        "demo-host",
                        "--platform-addresses",
                        "127.0.0.1",
                        "--dns-resolvers",
                        "127.0.0.53",
                    ],
                    log_path=log,
                    cwd=ROOT,
                    # From the environment, not argv (visible in ps); dev mode pins the signing
                    # key once, at each simulated agent's first enrollment.
                    env=dict(env, HOSTISO_AGENT_ENROLLMENT_KEY=demo_key),
                )
            )
            print(f"agents  3 simulated agents of {DEMO_ACCOUNT} (log: {log})", flush=True)
        if "settings" in started:
            print(f"portal  http://127.0.0.1:{started['settings']}/portal/", flush=True)
        token = mint_token(jwt_secret, sub="dev-soc", role="soc", ttl_s=86400)
        print(
            "dev token (role soc, 24 h; others: `HOSTISO_DEV=1 .venv/bin/hostiso token --role partner --account-id acct-demo`):",
            flush=True,
        )
        print(f"  export HOSTISO_TOKEN={token}", flush=True)
        print(f"tls     dev CA {ca.cert} (agent channel: enforcer over https)", flush=True)
        print(f"logs    {logs}/ — Ctrl-C stops everything.", flush=True)
        while not stopped.wait(1):
            for proc in procs:
                if proc.poll() is not None:
                    print(
                        f"a process exited ({proc.args!r} → {proc.returncode}); stopping",
                        flush=True,
                    )
                    stopped.set()
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        redis.close()
        kafka.stop()


if __name__ == "__main__":
    sys.exit(main())
