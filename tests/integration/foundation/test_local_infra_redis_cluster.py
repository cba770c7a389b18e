"""``python -m shared.infra up --redis-cluster --secure``: a TLS Redis Cluster with per-service ACLs."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import pytest
from redis.exceptions import NoPermissionError

from shared.redis import is_cluster_url, make_redis_client

pytestmark = pytest.mark.integration


async def test_up_redis_cluster_secure_prints_cluster_urls_that_confine_each_service() -> None:
    # Kafka's part of the line is the same as without --redis-cluster (test_infra_up_secure);
    # the 3-broker + Redis Cluster combination runs in the scale chaos scenario.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.infra",
        "up",
        "--no-kafka",
        "--redis-cluster",
        "--secure",
        "--redis-prefix",
        "rcsec:",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
        document: dict[str, Any] = json.loads(line)
        assert document["redis_url"].startswith("rediss+cluster://admin:")
        env = document["env"]
        for service in ("settings", "isolation", "enforcer"):
            url = env[service]["HOSTISO_REDIS_URL"]
            assert url.startswith(f"rediss+cluster://{service}:"), url
            assert is_cluster_url(url)
            assert env[service]["HOSTISO_REDIS_PREFIX"] == "rcsec:"
        assert "HOSTISO_REDIS_URL" not in env["platform"]

        client = make_redis_client(
            env["isolation"]["HOSTISO_REDIS_URL"], ca_file=env["isolation"]["HOSTISO_REDIS_CA_FILE"]
        )
        try:
            # Its own namespace, in every slot (the keys spread over the 3 masters).
            for bucket in range(16):
                key = "rcsec:isolation:{ep" + f"{bucket:02d}" + "}:probe"
                assert await client.set(key, "1")
                assert await client.get(key) == b"1"
            # Another service's prefix is refused: the ACL holds on every node.
            with pytest.raises(NoPermissionError):
                await client.set("rcsec:settings:probe", "1")
            with pytest.raises(NoPermissionError):
                await client.execute_command("FLUSHALL", target_nodes="primaries")
        finally:
            await client.aclose()

        # Plain TCP (no TLS) is not served at all.
        host_port = document["redis_url"].rsplit("@", 1)[1].split("/")[0]
        plain = make_redis_client(f"redis+cluster://{host_port}/0")
        try:
            with pytest.raises(Exception):  # noqa: B017 - any failure: TLS-only port
                await asyncio.wait_for(plain.ping(), timeout=10)
        finally:
            await plain.aclose()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
