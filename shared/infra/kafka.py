"""A real Apache Kafka broker (KRaft) run from Maven Central jars: single node or a 3-node cluster."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.infra.certs import CertPaths, issue_cert, make_ca
from shared.infra.proc import free_port, spawn, stop, wait_port
from shared.kafka_acls import ADMIN_PRINCIPAL, PRINCIPALS

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.2"
# The official image of the same release: docker-compose.yml and the testcontainers path of the
# tests (a unit test checks the compose file's tag and infra/pom.xml against KAFKA_VERSION).
KAFKA_IMAGE = f"apache/kafka:{KAFKA_VERSION}"
REPO_ROOT = Path(__file__).resolve().parents[2]
POM = REPO_ROOT / "infra" / "pom.xml"

_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.server.BrokerServer" level="INFO"/>
    <Logger name="state.change.logger" level="ERROR"/>
  </Loggers>
</Configuration>
"""


def cache_dir() -> Path:
    base = os.environ.get("HOSTISO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hostiso"
    )
    return Path(base)


def java_bin() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise RuntimeError("java not found: install a JDK 17+ (Debian: openjdk-17-jre-headless)")
    return found


def ensure_kafka_jars() -> Path:
    """Resolve the broker jars with Maven once; later calls return the cached directory."""
    libs = cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise RuntimeError("mvn not found: install Maven (Debian: maven) to fetch the Kafka jars")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    log.info("resolving Apache Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
            f"-Dkafka.version={KAFKA_VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"mvn could not resolve the Kafka jars:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.write_text(f"resolved in {time.monotonic() - started:.1f}s\n")
    return libs


# Subject of the certificate the brokers present to each other and to the controllers; the
# mTLS principal ``User:CN=hostiso-broker`` is a super user (inter-broker and controller traffic).
BROKER_CERT_NAME = "hostiso-broker"


def write_broker_tls(
    directory: Path,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1"),
    *,
    mode: int = 0o600,
) -> CertPaths:
    """A CA and the brokers' certificate as Kafka's PEM key store; returns the CA.

    ``broker-keystore.pem`` holds the unencrypted PKCS#8 key followed by the certificate chain
    (``ssl.keystore.type=PEM``); ``ca.pem`` is the trust store of brokers and clients.
    """
    ca = make_ca(directory, common_name="hostiso local Kafka CA")
    broker = issue_cert(ca, directory, BROKER_CERT_NAME, hosts)
    keystore = directory / "broker-keystore.pem"
    fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(broker.key.read_bytes() + broker.cert.read_bytes() + ca.cert.read_bytes())
    os.chmod(keystore, mode)
    return ca


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    internal_port: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"


@dataclass
class KafkaCluster:
    """One (default) or three KRaft nodes in combined broker+controller mode on 127.0.0.1.

    ``secure=True``: clients connect with SASL_SSL (SCRAM-SHA-512) as one of ``users`` (random
    passwords created per run, written into the storage at format time), the brokers talk to each
    other and to the controllers over mutual TLS, and StandardAuthorizer denies whatever no ACL
    allows (``shared.kafka_acls.provision_acls`` creates them per topic prefix).
    """

    nodes_count: int = 1
    heap: str = "512m"
    root: Path | None = None
    secure: bool = False
    nodes: list[_Node] = field(default_factory=list)
    cluster_id: str = ""
    users: dict[str, str] = field(default_factory=dict)
    ca: CertPaths | None = None
    _owns_root: bool = False

    @property
    def security_protocol(self) -> str:
        return "SASL_SSL" if self.secure else "PLAINTEXT"

    def client_options(self, user: str = ADMIN_PRINCIPAL) -> dict[str, Any]:
        """aiokafka keyword arguments to connect as ``user`` (nothing for a PLAINTEXT cluster)."""
        from shared.kafka import kafka_security_options

        if not self.secure:
            return {}
        return kafka_security_options(
            "SASL_SSL",
            username=user,
            password=self.users[user],
            cafile=str(self.ca.cert) if self.ca else None,
        )

    def client_env(self, user: str) -> dict[str, str]:
        """The HOSTISO_KAFKA_* variables of a service connecting as ``user``."""
        env = {"HOSTISO_KAFKA_BOOTSTRAP": self.bootstrap}
        if self.secure:
            assert self.ca is not None
            env |= {
                "HOSTISO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "HOSTISO_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "HOSTISO_KAFKA_SASL_USERNAME": user,
                "HOSTISO_KAFKA_SASL_PASSWORD": self.users[user],
                "HOSTISO_KAFKA_SSL_CAFILE": str(self.ca.cert),
            }
        return env

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def replication_factor(self) -> int:
        return 3 if self.nodes_count >= 3 else 1

    @property
    def min_insync_replicas(self) -> int:
        return 2 if self.nodes_count >= 3 else 1

    def start(self, timeout: float = 120.0) -> KafkaCluster:
        libs = ensure_kafka_jars()
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hostiso-kafka-"))
            self._owns_root = True
        self.cluster_id = self._storage_tool(libs, "random-uuid").strip().splitlines()[-1]
        self.nodes = [
            _Node(i + 1, free_port(), free_port(), self.root / f"node{i + 1}", None, free_port())
            for i in range(self.nodes_count)
        ]
        scram_args: list[str] = []
        if self.secure:
            self._make_tls_material(self.root / "tls")
            # Random per run, never in the repository; SCRAM salts and hashes them at format.
            self.users = {
                name: secrets.token_urlsafe(24) for name in (ADMIN_PRINCIPAL, *PRINCIPALS)
            }
            for name, password in self.users.items():
                scram_args += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            (node.workdir / "log4j2.xml").write_text(_LOG4J2)
            (node.workdir / "server.properties").write_text(self._properties(node, voters))
            self._storage_tool(
                libs,
                "format",
                "-t",
                self.cluster_id,
                "-c",
                str(node.workdir / "server.properties"),
                *scram_args,
            )
        for node in self.nodes:
            self._launch(libs, node)
        for node in self.nodes:
            wait_port(node.port, timeout=timeout, proc=node.proc, log_path=node.log_path)
        _check_client_roundtrip(
            self.bootstrap, self.replication_factor, timeout=timeout, options=self.client_options
        )
        return self

    def _make_tls_material(self, directory: Path) -> None:
        self.ca = write_broker_tls(directory)

    def _properties(self, node: _Node, voters: str) -> str:
        rf = self.replication_factor
        isr = self.min_insync_replicas
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={node.node_id}",
                f"controller.quorum.voters={voters}",
                *(self._secure_listeners(node) if self.secure else self._plain_listeners(node)),
                f"log.dirs={node.workdir / 'data'}",
                f"offsets.topic.replication.factor={rf}",
                "offsets.topic.num.partitions=10",
                f"transaction.state.log.replication.factor={rf}",
                f"transaction.state.log.min.isr={isr}",
                f"default.replication.factor={rf}",
                f"min.insync.replicas={isr}",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
                "num.partitions=1",
                "log.segment.bytes=67108864",
                "log.cleaner.backoff.ms=5000",
                "message.max.bytes=2097152",
                "",
            ]
        )

    @staticmethod
    def _plain_listeners(node: _Node) -> list[str]:
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
        ]

    def _secure_listeners(self, node: _Node) -> list[str]:
        # CLIENT: SASL_SSL + SCRAM for services and tools. INTERNAL (broker to broker) and
        # CONTROLLER: TLS with a client certificate from our CA required, so no listener accepts
        # an unauthenticated connection (KRaft controllers cannot authenticate with SCRAM: its
        # credentials live in the metadata they serve).
        assert self.ca is not None
        tls = self.ca.cert.parent
        return [
            "listeners="
            f"CLIENT://127.0.0.1:{node.port},INTERNAL://127.0.0.1:{node.internal_port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            f"advertised.listeners=CLIENT://127.0.0.1:{node.port},"
            f"INTERNAL://127.0.0.1:{node.internal_port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL",
            "inter.broker.listener.name=INTERNAL",
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "listener.name.client.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.internal.ssl.client.auth=required",
            "listener.name.controller.ssl.client.auth=required",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={tls / 'broker-keystore.pem'}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.ca.cert}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{ADMIN_PRINCIPAL};User:CN={BROKER_CERT_NAME}",
            "allow.everyone.if.no.acl.found=false",
        ]

    def _java_env(self, node: _Node | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("KAFKA_OPTS", None)
        return env

    def _storage_tool(self, libs: Path, *args: str) -> str:
        result = subprocess.run(
            [java_bin(), "-Xmx256m", "-cp", f"{libs}/*", "kafka.tools.StorageTool", *args],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout

    def _launch(self, libs: Path, node: _Node) -> None:
        node.proc = spawn(
            [
                java_bin(),
                f"-Xmx{self.heap}",
                f"-Xms{self.heap}",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={node.workdir / 'log4j2.xml'}",
                "-cp",
                f"{libs}/*",
                "kafka.Kafka",
                str(node.workdir / "server.properties"),
            ],
            log_path=node.log_path,
            cwd=node.workdir,
            env=self._java_env(node),
        )

    def stop_node(self, index: int, *, kill: bool = False) -> None:
        stop(self.nodes[index].proc, kill=kill)

    def start_node(self, index: int, timeout: float = 120.0) -> None:
        node = self.nodes[index]
        self._launch(ensure_kafka_jars(), node)
        wait_port(node.port, timeout=timeout, proc=node.proc, log_path=node.log_path)

    def restart(self, timeout: float = 120.0) -> None:
        """Stop every node (SIGTERM) and start them again on the same ports and data."""
        for i in range(len(self.nodes)):
            self.stop_node(i)
        for i in range(len(self.nodes)):
            self.start_node(i, timeout)
        _check_client_roundtrip(
            self.bootstrap, self.replication_factor, timeout=timeout, options=self.client_options
        )

    def stop(self) -> None:
        for node in self.nodes:
            stop(node.proc)
        if self._owns_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def LocalKafka(
    heap: str = "512m", root: Path | None = None, *, secure: bool = False
) -> KafkaCluster:
    """A single-node KRaft broker."""
    return KafkaCluster(nodes_count=1, heap=heap, root=root, secure=secure)


def _check_client_roundtrip(
    bootstrap: str,
    rf: int,
    *,
    timeout: float,
    options: Callable[[], dict[str, Any]] = dict,
) -> None:
    """Ready means a client can create a topic, produce to it and consume from it.

    ``options`` builds the admin's connection options inside the checking thread's loop.
    """
    error: list[BaseException] = []

    def runner() -> None:
        try:
            asyncio.run(_roundtrip(bootstrap, rf, timeout, options()))
        except BaseException as exc:  # reported to the calling thread below
            error.append(exc)

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    thread.join(timeout + 10)
    if thread.is_alive():
        raise TimeoutError(f"Kafka at {bootstrap} not ready after {timeout}s")
    if error:
        raise RuntimeError(f"Kafka at {bootstrap} not ready: {error[0]!r}") from error[0]


async def _roundtrip(bootstrap: str, rf: int, timeout: float, options: dict[str, Any]) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    deadline = time.monotonic() + timeout
    topic = f"__hostiso_ready_{uuid.uuid4().hex[:8]}"
    while True:
        admin = AIOKafkaAdminClient(**options, bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.create_topics([NewTopic(topic, 1, rf)])
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
        finally:
            await admin.close()
    producer = AIOKafkaProducer(
        **options, bootstrap_servers=bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        while True:
            try:
                await producer.send_and_wait(topic, b"ready")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**options, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records = await consumer.getmany(tp, timeout_ms=int(timeout * 1000))
        if not records.get(tp):
            raise TimeoutError("produced record not consumed")
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(**options, bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
