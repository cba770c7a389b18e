"""``python -m shared.infra up --secure`` prints one JSON line a service can connect with as is."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from redis.exceptions import NoPermissionError

from shared.config import ServiceSettings
from shared.kafka import kafka_client_options
from shared.redis import make_redis
from shared.topics import Topics


async def test_up_secure_prints_a_per_service_environment_that_works() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.infra",
        "up",
        "--secure",
        "--topic-prefix",
        "upsec.",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=180)
        document: dict[str, Any] = json.loads(line)
        assert set(document) == {"kafka_bootstrap", "redis_url", "env"}
        env = document["env"]
        assert set(env) == {"settings", "isolation", "enforcer", "platform", "admin"}
        assert len({e["HOSTISO_KAFKA_SASL_PASSWORD"] for e in env.values()}) == 5
        assert "HOSTISO_REDIS_URL" not in env["platform"]

        # The environment is complete: settings are built from it alone, as a service would.
        settings = {
            name: ServiceSettings.model_validate(
                {k.removeprefix("HOSTISO_").lower(): v for k, v in env[name].items()}
                | {"dev": True}
            )
            for name in ("settings", "isolation")
        }
        topics = Topics(settings["settings"].topic_prefix)
        for name, allowed in (("isolation", True), ("settings", False)):
            producer = AIOKafkaProducer(
                **kafka_client_options(settings[name]),
                bootstrap_servers=settings[name].kafka_bootstrap,
                request_timeout_ms=10_000,
            )
            await producer.start()
            try:
                if allowed:
                    await producer.send_and_wait(topics.enforcer_commands, b"{}", key=b"ep")
                else:
                    with pytest.raises(TopicAuthorizationFailedError):
                        await producer.send_and_wait(topics.enforcer_commands, b"x", key=b"ep")
            finally:
                await producer.stop()

        assert env["settings"]["HOSTISO_REDIS_URL"].startswith("rediss://settings:")
        redis = make_redis(
            env["settings"]["HOSTISO_REDIS_URL"], ca_file=env["settings"]["HOSTISO_REDIS_CA_FILE"]
        )
        try:
            assert await redis.set("hostiso:settings:probe", "1")
            with pytest.raises(NoPermissionError):
                await redis.execute_command("FLUSHALL")
        finally:
            await redis.aclose()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
