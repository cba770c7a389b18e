"""A local Redis Cluster from Debian's ``redis-server``: N masters, optionally a replica each."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.infra.proc import free_port, spawn, stop, wait_port
from shared.infra.redis import ensure_redis_server, local_server_args


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
    """

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
    root: Path | None = None
    nodes: list[_ClusterNode] = field(default_factory=list)
    _owns_dir: bool = False

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL the services take (any node bootstraps the client)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 60.0) -> LocalRedisCluster:
        if self.masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hostiso-redis-cluster-"))
            self._owns_dir = True
        taken: set[int] = set()
        for index in range(self.masters * (1 + self.replicas)):
            node = _ClusterNode(port=0, bus_port=0, workdir=self.root / f"node-{index}")
            node.workdir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(node)
            self._start_on_free_ports(node, taken, timeout)
        result = subprocess.run(
            [
                _redis_cli(),
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

    def _spawn(self, node: _ClusterNode) -> None:
        node.proc = spawn(
            [
                ensure_redis_server(),
                "--port",
                str(node.port),
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
                *local_server_args(node.workdir),
            ],
            log_path=node.log_path,
        )

    def _cli(self, port: int, *args: str) -> str:
        result = subprocess.run(
            [_redis_cli(), "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout

    def cluster_ok(self, port: int) -> bool:
        return "cluster_state:ok" in self._cli(port, "cluster", "info")

    def _replica_synced(self, port: int) -> bool:
        info = self._cli(port, "info", "replication")
        return "role:master" in info or "master_link_status:up" in info

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

    def master_of(self, key: str) -> int:
        """Index in ``nodes`` of the master that serves ``key``'s slot now."""
        slot = self._cli(self.nodes[0].port, "cluster", "keyslot", key).strip()
        for line in self._cli(self.nodes[0].port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                    port = int(fields[1].split(":")[1].split("@")[0])
                    return self.ports.index(port)
        raise LookupError(f"no master serves slot {slot} of {key!r}")

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
