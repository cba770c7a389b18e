"""A local Redis Cluster from Debian's ``redis-server``: N masters, optionally a replica each."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from shared.infra.certs import CertPaths, make_ca
from shared.infra.proc import free_port, spawn, stop, wait_port
from shared.infra.redis import (
    REDIS_ADMIN_USER,
    ensure_redis_server,
    local_server_args,
    new_passwords,
    tls_server_args,
    write_acl_config,
)


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if not found:
        raise RuntimeError("redis-cli not found: it comes with Debian's redis-tools/redis-server")
    return found


@dataclass
class _ClusterNode:
    port: int
    bus_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"


@dataclass
class LocalRedisCluster:
    """``masters`` masters (3 at least, as Redis Cluster requires) and ``replicas`` per master.

    Every node runs with ``cluster-enabled yes`` and AOF in a temp dir; ``redis-cli --cluster
    create`` assigns the 16384 slots. Nodes can be stopped, SIGKILLed and restarted in place (a
    restarted node rejoins with its ``nodes.conf``), so failover can be tested.

    ``secure=True``: on every node the ACL users of ``LocalRedis`` (default user off, ``admin``,
    one user per service confined to ``key_prefix``, plus the CLUSTER SLOTS/SHARDS/NODES a
    cluster client reads), TLS only for clients (``tls-port``, no plain port), and TLS on the
    cluster bus and replication too (``tls-cluster yes``, ``tls-replication yes``); replicas
    authenticate to their master as ``admin``. All nodes share one CA (``ca_file``).
    """

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
    root: Path | None = None
    nodes: list[_ClusterNode] = field(default_factory=list)
    secure: bool = False
    key_prefix: str = "hostiso:"
    appendfsync: str = "everysec"
    passwords: dict[str, str] = field(default_factory=dict)
    ca: CertPaths | None = None
    _owns_dir: bool = False

    @property
    def scheme(self) -> str:
        return "rediss+cluster" if self.secure else "redis+cluster"

    @property
    def ca_file(self) -> str | None:
        return str(self.ca.cert) if self.ca is not None else None

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL the services take (any node bootstraps the client);
        secure: the admin's ``rediss+cluster://`` URL (tooling and tests)."""
        if self.secure:
            return self.url_for(REDIS_ADMIN_USER)
        return f"{self.scheme}://127.0.0.1:{self.nodes[0].port}/0"

    def url_for(self, user: str) -> str:
        """``user``'s URL (secure), else the only one."""
        if not self.secure:
            return self.url
        password = quote(self.passwords[user], safe="")
        return f"{self.scheme}://{user}:{password}@127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 60.0) -> LocalRedisCluster:
        if self.masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hostiso-redis-cluster-"))
            self._owns_dir = True
        if self.secure:
            self.passwords = self.passwords or new_passwords()
            self.ca = self.ca or make_ca(self.root / "tls", common_name="hostiso local Redis CA")
        taken: set[int] = set()
        for index in range(self.masters * (1 + self.replicas)):
            node = _ClusterNode(port=0, bus_port=0, workdir=self.root / f"node-{index}")
            node.workdir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(node)
            self._start_on_free_ports(node, taken, timeout)
        result = subprocess.run(
            [
                *self._cli_args(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self._cli_env(),
        )
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )
        self.wait_healthy(timeout=timeout)
        return self

    def _start_on_free_ports(self, node: _ClusterNode, taken: set[int], timeout: float) -> None:
        # The bus port is given, not derived (port + 10000 may be taken or above 65535). A port
        # found free can be taken by another process before the node binds it: try new ones.
        for attempt in range(3):
            node.port, node.bus_port = self._two_free_ports(taken)
            self._spawn(node)
            try:
                wait_port(node.port, timeout=timeout, proc=node.proc, log_path=node.log_path)
                return
            except RuntimeError:
                stop(node.proc, kill=True)
                if attempt == 2:
                    raise

    @staticmethod
    def _two_free_ports(taken: set[int]) -> tuple[int, int]:
        ports: list[int] = []
        while len(ports) < 2:
            port = free_port()
            if port not in taken:
                taken.add(port)
                ports.append(port)
        return ports[0], ports[1]

    def _security_args(self, node: _ClusterNode) -> list[str]:
        if not self.secure:
            return ["--port", str(node.port)]
        assert self.ca is not None
        # Replicas authenticate to their master (any master: a failover changes which one).
        config = write_acl_config(
            node.workdir / "redis.conf",
            self.passwords,
            self.key_prefix,
            cluster=True,
            extra=(
                f"masteruser {REDIS_ADMIN_USER}",
                f"masterauth {self.passwords[REDIS_ADMIN_USER]}",
            ),
        )
        return [
            str(config),
            *tls_server_args(self.ca, node.workdir, node.port),
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
        ]

    def _spawn(self, node: _ClusterNode) -> None:
        security = self._security_args(node)
        # The config file (secure) must be redis-server's first argument.
        config, options = (security[:1], security[1:]) if self.secure else ([], security)
        node.proc = spawn(
            [
                ensure_redis_server(),
                *config,
                *options,
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(node.bus_port),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # Replicas sync at once (the default waits 5 s to batch diskless transfers): a
                # replica that never synced refuses to take over from a failed master.
                "--repl-diskless-sync-delay",
                "0",
                *local_server_args(node.workdir, appendfsync=self.appendfsync),
            ],
            log_path=node.log_path,
        )

    def _cli_args(self) -> list[str]:
        if not self.secure:
            return [_redis_cli()]
        assert self.ca is not None
        return [_redis_cli(), "--tls", "--cacert", str(self.ca.cert), "--user", REDIS_ADMIN_USER]

    def _cli_env(self) -> dict[str, str] | None:
        # The password through the environment, not the command line (visible in ps).
        if not self.secure:
            return None
        return dict(os.environ, REDISCLI_AUTH=self.passwords[REDIS_ADMIN_USER])

    def _cli(self, port: int, *args: str) -> str:
        result = subprocess.run(
            [*self._cli_args(), "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env=self._cli_env(),
        )
        return result.stdout

    def cluster_ok(self, port: int) -> bool:
        return "cluster_state:ok" in self._cli(port, "cluster", "info")

    def _replica_synced(self, port: int) -> bool:
        info = self._cli(port, "info", "replication")
        return "role:master" in info or "master_link_status:up" in info

    def wait_replicated(self, index: int, timeout: float = 30.0) -> None:
        """Until every replica of the master ``nodes[index]`` has acknowledged all it holds now.

        Replication is asynchronous: a write acknowledged by a master that is SIGKILLed before
        its replica got it is lost with it, as on any Redis Cluster. A test that asserts the
        data survives a failover waits for this first."""
        port = self.nodes[index].port
        deadline = time.monotonic() + timeout
        target: int | None = None
        while time.monotonic() < deadline:
            fields = dict(
                line.split(":", 1)
                for line in self._cli(port, "info", "replication").splitlines()
                if ":" in line
            )
            if target is None:
                target = int(fields.get("master_repl_offset", "0").strip())
            offsets = [
                int(part.split("=", 1)[1])
                for key, value in fields.items()
                if key.startswith("slave") and key[5:].isdigit()
                for part in value.strip().split(",")
                if part.startswith("offset=")
            ]
            if offsets and min(offsets) >= target:
                return
            time.sleep(0.1)
        raise RuntimeError(f"replicas of node {index} did not catch up within {timeout}s")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every running node reports ``cluster_state:ok`` and every replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            if running and all(
                self.cluster_ok(n.port) and self._replica_synced(n.port) for n in running
            ):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Redis Cluster not healthy within {timeout}s (ports {self.ports})")

    def _running_port(self) -> int:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                return node.port
        raise RuntimeError("no Redis Cluster node is running")

    def _live_masters(self) -> list[tuple[int, list[str]]]:
        """(index in ``nodes``, slot spans) of every master that has not failed, as a running
        node sees the cluster now."""
        out = []
        for line in self._cli(self._running_port(), "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split(":")[1].split("@")[0])
            out.append((self.ports.index(port), fields[8:]))
        return out

    def master_indexes(self) -> list[int]:
        """Indexes in ``nodes`` of the masters serving slots now (a promoted replica included)."""
        return sorted(index for index, spans in self._live_masters() if spans)

    def master_of(self, key: str) -> int:
        """Index in ``nodes`` of the master that serves ``key``'s slot now."""
        slot = self._cli(self._running_port(), "cluster", "keyslot", key).strip()
        for index, spans in self._live_masters():
            for span in spans:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                    return index
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def stop_node(self, index: int, *, kill: bool = False) -> None:
        stop(self.nodes[index].proc, kill=kill)

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        node = self.nodes[index]
        self._spawn(node)
        wait_port(node.port, timeout=timeout, proc=node.proc, log_path=node.log_path)

    def stop(self) -> None:
        for node in self.nodes:
            stop(node.proc)

    def close(self) -> None:
        self.stop()
        if self._owns_dir and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
