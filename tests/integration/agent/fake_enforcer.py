"""A tiny in-test stand-in for the enforcer's agent API (contracts.md), served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request, Response

from shared.infra.proc import free_port
from shared.messages import SignedPolicy
from tests.helpers import wait_for
from tests.unit.agent.policies import TestSigner


class FakeEnforcer:
    """Enrollment, signing key, long-poll mailbox and status reports, all in memory."""

    ENROLLMENT_KEY = "e" * 64

    def __init__(self, signer: TestSigner, host: str = "127.0.0.1") -> None:
        self.signer = signer
        self.host = host
        self.tokens: dict[str, str] = {}
        self.enrollments: list[dict[str, Any]] = []
        self.mailbox: dict[str, SignedPolicy | bytes] = {}
        self.ignore_after = False
        self.fail_next_polls = 0
        self.polls: list[tuple[str, int]] = []
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self.closing = False
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.ssl: tuple[Path, Path] | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, agent_id: str, delivery: SignedPolicy | bytes) -> None:
        self.mailbox[agent_id] = delivery
        self.changed.set()
        self.changed = asyncio.Event()

    def forget(self, agent_id: str) -> None:
        self.tokens.pop(agent_id, None)

    def reports_for(self, agent_id: str) -> list[dict[str, Any]]:
        return [body for who, body in self.reports if who == agent_id]

    def _check(self, agent_id: str, authorization: str | None) -> None:
        if agent_id not in self.tokens:
            raise HTTPException(404, "unknown agent")
        if authorization != f"Bearer {self.tokens[agent_id]}":
            raise HTTPException(401, "bad token")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/agents/enroll")
        async def enroll(body: dict[str, Any]) -> dict[str, str]:
            if body.get("enrollment_key") != self.ENROLLMENT_KEY:
                raise HTTPException(403, "enrollment_key: does not match the account")
            self.enrollments.append(body)
            # As the enforcer does: re-enrolling names the endpoint it already is and keeps it.
            agent_id = str(body.get("endpoint_id") or f"ep-{len(self.enrollments)}")
            self.tokens[agent_id] = f"tok-{agent_id}"
            return {"agent_id": agent_id, "agent_token": self.tokens[agent_id]}

        @app.get("/v1/signing-key")
        async def signing_key() -> dict[str, str]:
            return {
                "key_id": self.signer.key_id,
                "algorithm": "Ed25519",
                "public_key": self.signer.public_b64,
            }

        @app.get("/v1/agents/{agent_id}/policy")
        async def poll(
            agent_id: str, after: int, wait: float, authorization: str | None = Header(None)
        ) -> Response:
            self._check(agent_id, authorization)
            self.polls.append((agent_id, after))
            if self.fail_next_polls > 0:
                self.fail_next_polls -= 1
                return Response(status_code=503)
            deadline = time.monotonic() + wait
            while not self.closing:
                delivery = self.mailbox.get(agent_id)
                if isinstance(delivery, bytes):
                    return Response(delivery, media_type="application/json")
                if delivery is not None and (self.ignore_after or delivery.policy.sequence > after):
                    return Response(delivery.model_dump_json(), media_type="application/json")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Response(status_code=204)
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except TimeoutError:
                    return Response(status_code=204)
            return Response(status_code=204)

        @app.post("/v1/agents/{agent_id}/policy-status", status_code=202)
        async def status(
            agent_id: str, request: Request, authorization: str | None = Header(None)
        ) -> dict[str, str]:
            self._check(agent_id, authorization)
            self.reports.append((agent_id, await request.json()))
            return {"status": "accepted"}

        return app

    def use_tls(self, cert: Path, key: Path) -> None:
        """Serve HTTPS with this certificate (call before ``start``)."""
        self.ssl = (cert, key)
        self.url = f"https://{self.host}:{self.port}"

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app(),
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=self.ssl[0] if self.ssl else None,
            ssl_keyfile=self.ssl[1] if self.ssl else None,
        )
        self._server = uvicorn.Server(config)
        # uvicorn would take over SIGINT/SIGTERM of the test process otherwise.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve())
        server, task = self._server, self._task

        def started() -> bool:
            if task.done():
                task.result()
            return server.started

        await wait_for(started, timeout=10, message="fake enforcer started")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            # Answer the waiting long polls now, or uvicorn's graceful shutdown waits them out.
            self.closing = True
            self.changed.set()
            self._server.should_exit = True
            await self._task
