"""A local ``redis-server`` from Debian's packages, with AOF, on a free port."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.infra.proc import free_port, spawn, stop, wait_port


def ensure_redis_server() -> str:
    """Path of redis-server; installed with apt-get when missing and we are root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError(
        "redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server)"
    )


@dataclass
class LocalRedis:
    """redis-server with ``appendonly yes`` and its data in a temp dir; restartable in place."""

    port: int = 0
    appendfsync: str = "everysec"
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _owns_dir: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> LocalRedis:
        binary = ensure_redis_server()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="hostiso-redis-"))
            self._owns_dir = True
        if not self.port:
            self.port = free_port()
        log_path = self.workdir / "redis.log"
        self.proc = spawn(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
                "--notify-keyspace-events",
                "",
            ],
            log_path=log_path,
        )
        wait_port(self.port, timeout=timeout, proc=self.proc, log_path=log_path)
        return self

    def stop(self, *, kill: bool = False) -> None:
        stop(self.proc, kill=kill)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM or SIGKILL) and start on the same port and data directory."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._owns_dir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
