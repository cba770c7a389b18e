"""The real stack as processes: the three services on free ports and two simulated agents."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from shared.auth import mint_token
from shared.config import DEV_ENROLLMENT_SECRET, DEV_JWT_SECRET
from shared.enrollment import enrollment_key
from shared.infra.proc import free_port, spawn, stop
from shared.kafka import ensure_topics
from shared.kafka_acls import provision_acls
from shared.topics import Topics
from tests.helpers import ServiceProcess, kafka_admin_options

ROOT = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def poll(condition: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll ``condition`` until it is truthy, failing after ``timeout`` (sync ``wait_for``).

    Sync on purpose: the browser test drives Playwright's sync API, which refuses to run
    inside an event loop.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class RealStack:
    """URLs of the running services, the account the agents enrolled in, and their endpoints."""

    settings_url: str
    isolation_url: str
    enforcer_url: str
    account_id: str
    endpoints: list[str]
    logs: Path
    topic_prefix: str

    def token(self, role: str, *, account: bool = True, sub: str = "") -> str:
        return mint_token(
            DEV_JWT_SECRET,
            sub=sub or f"{role}@e2e.example",
            role=role,  # type: ignore[arg-type]
            account_id=self.account_id if account and role == "partner" else None,
        )

    def api(self, role: str = "soc") -> httpx.Client:
        return httpx.Client(headers={"Authorization": f"Bearer {self.token(role)}"}, timeout=10.0)

    def spans(self, service: str) -> list[dict[str, Any]]:
        """The spans a service printed so far (console exporter: one JSON object per line)."""
        spans = []
        for line in (self.logs / f"{service}.log").read_text(errors="replace").splitlines():
            if line.startswith('{"name"'):
                spans.append(json.loads(line))
        return spans

    def isolation(self, endpoint_id: str) -> dict[str, Any]:
        with self.api() as client:
            response = client.get(f"{self.isolation_url}/v1/endpoints/{endpoint_id}/isolation")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


def _enrolled(state_dir: Path) -> list[str]:
    found = []
    for path in sorted(state_dir.glob("**/agent-state.json")):
        try:
            agent_id = json.loads(path.read_text()).get("agent_id")
        except (OSError, ValueError):
            continue  # written atomically, but the directory may be mid-creation
        if agent_id:
            found.append(agent_id)
    return found


@pytest.fixture(scope="module")
def realstack(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealStack]:
    work = tmp_path_factory.mktemp("realstack")
    suffix = uuid.uuid4().hex[:10]
    env = {
        "HOSTISO_DEV": "1",
        "HOSTISO_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HOSTISO_REDIS_URL": redis_url,
        "HOSTISO_TOPIC_PREFIX": f"rs{suffix}.",
        "HOSTISO_REDIS_PREFIX": f"rs{suffix}:",
        "HOSTISO_LOG_LEVEL": "WARNING",
        # A loaded CI machine can take seconds to publish an account's first change; 503 (saved,
        # not yet in Kafka) is for Kafka being down, which no test here simulates.
        "HOSTISO_PUBLISH_WAIT_S": "30",
        # Spans as JSON lines in each service's log, flushed promptly for the trace check.
        "HOSTISO_OTEL_EXPORTER": "console",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    ports = {name: free_port() for name in ("settings", "isolation", "enforcer")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    extra = {
        "settings": {"HOSTISO_ISOLATION_PUBLIC_URL": urls["isolation"]},
        "isolation": {
            "HOSTISO_SETTINGS_URL": urls["settings"],
            "HOSTISO_CORS_ORIGINS": urls["settings"],
        },
        "enforcer": {},
    }
    services = [
        ServiceProcess(
            f"services.{name}", {**env, **extra[name]}, ports[name], work / f"{name}.log"
        )
        for name in ("settings", "enforcer", "isolation")
    ]
    account_id = f"acct-{suffix}"
    agents: Any = None
    if kafka_admin_options():
        # The services' principals may not create topics: provision them and their ACLs first.
        prefix = Topics(env["HOSTISO_TOPIC_PREFIX"])

        async def provision() -> None:
            await ensure_topics(kafka_bootstrap, prefix, options=kafka_admin_options())
            await provision_acls(kafka_bootstrap, prefix, options=kafka_admin_options())

        asyncio.run(provision())
    try:
        for service in services:
            service.start()
        for service in services:
            poll(lambda s=service: _ready(s), timeout=60, what=f"{service.module} /ready")
        agents = spawn(
            [
                sys.executable,
                "-m",
                "agent",
                "--simulated",
                "--count",
                "2",
                "--account-id",
                account_id,
                "--enrollment-key",
                enrollment_key(DEV_ENROLLMENT_SECRET, account_id),
                "--enforcer-url",
                urls["enforcer"],
                "--state-dir",
                str(work / "agents"),
                "--log-level",
                "WARNING",
            ],
            log_path=work / "agents.log",
            env=dict(os.environ, **env),
        )
        endpoints = poll(
            lambda: len(found := _enrolled(work / "agents")) == 2 and found,
            timeout=30,
            what="two simulated agents enrolled",
        )
        stack = RealStack(
            settings_url=urls["settings"],
            isolation_url=urls["isolation"],
            enforcer_url=urls["enforcer"],
            account_id=account_id,
            endpoints=sorted(endpoints),
            logs=work,
            topic_prefix=env["HOSTISO_TOPIC_PREFIX"],
        )
        # The isolation service learns endpoints from endpoints.v1: wait until it knows both.
        with stack.api() as client:
            for endpoint_id in stack.endpoints:
                url = f"{stack.isolation_url}/v1/endpoints/{endpoint_id}/isolation/preview"
                poll(
                    lambda u=url: client.get(u).status_code == 200,
                    timeout=30,
                    what=f"isolation service knows {endpoint_id}",
                )
        yield stack
    finally:
        if agents is not None:
            stop(agents)
        for service in reversed(services):
            # A short grace: the enforcer can take 15 s to stop on SIGTERM (reported).
            stop(service.proc, timeout=3)


def _ready(service: ServiceProcess) -> bool:
    if service.proc.poll() is not None:
        raise AssertionError(
            f"{service.module} exited with {service.proc.returncode}:\n"
            + service.log_path.read_text(errors="replace")[-4000:]
        )
    try:
        return httpx.get(f"{service.url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from tests.e2e.portal.conftest import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    path = Path(os.environ.get("HOSTISO_SCREENSHOT_DIR", ROOT / "artifacts" / "screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path
