"""A local ``redis-server`` from Debian's packages, with AOF, on a free port."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from shared.infra.certs import CertPaths, issue_cert, make_ca
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


# Each service's Redis user: what it may run, and under which key namespace (``Keys``: the
# services write ``<prefix><service>:…``; the enforcer also publishes policy wake-ups on
# ``<prefix>enforcer:wake``). Everything @dangerous (FLUSHALL, FLUSHDB, CONFIG, KEYS, DEBUG,
# SHUTDOWN, MONITOR, ACL …) is refused; scripts (EVALSHA, SCRIPT LOAD) and MULTI are needed.
SERVICE_REDIS_USERS = ("settings", "isolation", "enforcer")
REDIS_ADMIN_USER = "admin"
_SERVICE_COMMANDS = "-@all +@read +@write +@keyspace +@scripting +@transaction +@connection"


# What a Redis Cluster client needs besides (redis-py reads the slot map with CLUSTER SLOTS and
# follows MOVED/ASK redirects; ASKING and READONLY are @connection already).
_CLUSTER_COMMANDS = " +cluster|slots +cluster|shards +cluster|nodes +cluster|info +cluster|myid"


def redis_acl_rules(service: str, key_prefix: str, *, cluster: bool = False) -> str:
    """The ACL rules (after the password) of ``service``'s user, keys limited to its namespace."""
    channels = f"&{key_prefix}{service}:*" if service == "enforcer" else ""
    pubsub = " +@pubsub" if service == "enforcer" else ""
    topology = _CLUSTER_COMMANDS if cluster else ""
    return (
        f"resetkeys ~{key_prefix}{service}:* resetchannels {channels} "
        f"{_SERVICE_COMMANDS}{pubsub}{topology} -@dangerous"
    ).replace("  ", " ")


def new_passwords() -> dict[str, str]:
    """Random per run, never in the repository: the admin's and each service user's."""
    return {name: secrets.token_urlsafe(24) for name in (REDIS_ADMIN_USER, *SERVICE_REDIS_USERS)}


def write_acl_config(
    path: Path,
    passwords: dict[str, str],
    key_prefix: str,
    *,
    cluster: bool = False,
    extra: tuple[str, ...] = (),
) -> Path:
    """A ``redis.conf`` (mode 0600) with the default user off, ``admin`` and the service users.

    ``extra``: more config lines (a cluster node's replication credentials).
    """
    lines = [
        "user default off resetkeys -@all",
        f"user {REDIS_ADMIN_USER} on >{passwords[REDIS_ADMIN_USER]} ~* &* +@all",
    ]
    for service in SERVICE_REDIS_USERS:
        rules = redis_acl_rules(service, key_prefix, cluster=cluster)
        lines.append(f"user {service} on >{passwords[service]} {rules}")
    lines.extend(extra)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


def tls_server_args(ca: CertPaths, workdir: Path, port: int) -> list[str]:
    """TLS only on ``port`` (no plain port), a server certificate issued by ``ca``."""
    server = issue_cert(ca, workdir / "tls", "redis")
    return [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(server.cert),
        "--tls-key-file",
        str(server.key),
        "--tls-ca-cert-file",
        str(ca.cert),
        # Clients authenticate with their ACL user; the certificate proves the server.
        "--tls-auth-clients",
        "no",
    ]


def local_server_args(workdir: Path, *, appendfsync: str = "everysec") -> list[str]:
    """The ``redis-server`` options every local node runs with: loopback, AOF in ``workdir``."""
    return [
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
    ]


@dataclass
class LocalRedis:
    """redis-server with ``appendonly yes`` and its data in a temp dir; restartable in place.

    ``secure=True``: the default user is off; ``admin`` (all commands) and one user per service
    (``redis_acl_rules``) with random passwords; ``key_prefix`` is the key namespace the service
    users are confined to (a glob: the test suite uses ``*`` for its random per-test prefixes).
    """

    port: int = 0
    appendfsync: str = "everysec"
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    secure: bool = False
    key_prefix: str = "hostiso:"
    # TLS only (no plain port), server certificate from a CA of its own (``ca_file``).
    tls: bool = False
    passwords: dict[str, str] = field(default_factory=dict)
    ca: CertPaths | None = None
    _owns_dir: bool = False

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    @property
    def ca_file(self) -> str | None:
        return str(self.ca.cert) if self.ca is not None else None

    @property
    def url(self) -> str:
        """Plain: the only URL; secure: the admin's (tooling and tests)."""
        if self.secure:
            return self.url_for(REDIS_ADMIN_USER)
        return f"{self.scheme}://127.0.0.1:{self.port}/0"

    def url_for(self, user: str) -> str:
        if not self.secure:
            return self.url
        password = quote(self.passwords[user], safe="")
        return f"{self.scheme}://{user}:{password}@127.0.0.1:{self.port}/0"

    def _tls_args(self, workdir: Path) -> list[str]:
        if self.ca is None:
            self.ca = make_ca(workdir / "tls", common_name="hostiso local Redis CA")
        return tls_server_args(self.ca, workdir, self.port)

    def _write_acl_config(self, workdir: Path) -> Path:
        if not self.passwords:
            # Kept across restart() of this instance.
            self.passwords = new_passwords()
        return write_acl_config(workdir / "redis.conf", self.passwords, self.key_prefix)

    def start(self, timeout: float = 30.0) -> LocalRedis:
        binary = ensure_redis_server()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="hostiso-redis-"))
            self._owns_dir = True
        if not self.port:
            self.port = free_port()
        log_path = self.workdir / "redis.log"
        config = [str(self._write_acl_config(self.workdir))] if self.secure else []
        ports = self._tls_args(self.workdir) if self.tls else ["--port", str(self.port)]
        self.proc = spawn(
            [
                binary,
                *config,
                *ports,
                *local_server_args(self.workdir, appendfsync=self.appendfsync),
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
