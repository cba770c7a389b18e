"""``python -m shared.infra``: start a local Kafka (1 or 3 nodes) and/or Redis until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.infra.kafka import KafkaCluster, ensure_kafka_jars, write_broker_tls
from shared.infra.redis import SERVICE_REDIS_USERS, LocalRedis
from shared.infra.redis_cluster import LocalRedisCluster
from shared.kafka import ensure_topics, kafka_security_options
from shared.kafka_acls import (
    ADMIN_PRINCIPAL,
    PLATFORM_PRINCIPAL,
    SERVICE_PRINCIPALS,
    provision_acls,
)
from shared.topics import Topics

app = typer.Typer(help="Local Apache Kafka (KRaft) and Redis without Docker.", no_args_is_help=True)


def _wait_for_signal() -> None:
    stopped = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()


@app.command()
def jars() -> None:
    """Resolve the Kafka jars into the cache (Maven) and print where they are."""
    typer.echo(ensure_kafka_jars())


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for ca.pem and broker-keystore.pem")],
    hosts: Annotated[
        str, typer.Option(help="Comma-separated names and addresses in the broker certificate")
    ] = "kafka,localhost,127.0.0.1",
    mode: Annotated[str, typer.Option(help="Octal file mode of the key store")] = "600",
) -> None:
    """Dev/test TLS material for a broker (docker compose); kept if ``out`` already has it."""
    if (out / "broker-keystore.pem").exists() and (out / "ca.pem").exists():
        typer.echo(f"kept the TLS material in {out}")
        return
    names = tuple(h.strip() for h in hosts.split(",") if h.strip())
    write_broker_tls(out, names, mode=int(mode, 8))
    typer.echo(f"wrote {out / 'ca.pem'} and {out / 'broker-keystore.pem'}")


@app.command()
def up(
    kafka: Annotated[bool, typer.Option(help="Start Kafka")] = True,
    redis: Annotated[bool, typer.Option(help="Start Redis")] = True,
    nodes: Annotated[int, typer.Option(help="Kafka nodes: 1, or 3 for RF 3 / min ISR 2")] = 1,
    topic_prefix: Annotated[
        str, typer.Option(help="Create the topics with this prefix")
    ] = "hostiso.",
    redis_prefix: Annotated[
        str, typer.Option(help="Key namespace the Redis service users are confined to")
    ] = "hostiso:",
    secure: Annotated[
        bool,
        typer.Option(
            help="Kafka SASL_SSL + SCRAM + ACLs, Redis ACL users and TLS; prints the JSON line "
            "of docs/operations.md with every principal's credentials"
        ),
    ] = False,
    redis_cluster: Annotated[
        bool,
        typer.Option(
            "--redis-cluster",
            help="A Redis Cluster (3 masters, a replica each) instead of one redis-server; "
            "the URLs are redis+cluster:// (rediss+cluster:// with --secure)",
        ),
    ] = False,
    redis_replicas: Annotated[
        int, typer.Option(help="Replicas per Redis Cluster master (with --redis-cluster)")
    ] = 1,
) -> None:
    """Start the infrastructure in the foreground; Ctrl-C stops it and removes its data."""
    cluster: KafkaCluster | None = None
    local_redis: LocalRedis | LocalRedisCluster | None = None
    try:
        if kafka:
            started = time.monotonic()
            cluster = KafkaCluster(nodes_count=nodes, secure=secure).start()
            asyncio.run(_provision(cluster, Topics(topic_prefix)))
            typer.echo(
                f"kafka ({cluster.security_protocol}) ready in {time.monotonic() - started:.1f}s: "
                f"HOSTISO_KAFKA_BOOTSTRAP={cluster.bootstrap}",
                err=secure,
            )
        if redis and redis_cluster:
            local_redis = LocalRedisCluster(
                masters=3, replicas=redis_replicas, secure=secure, key_prefix=redis_prefix
            ).start()
            typer.echo(
                f"redis cluster ({len(local_redis.nodes)} nodes, ports {local_redis.ports}) "
                f"ready: HOSTISO_REDIS_URL={local_redis.url if not secure else '(see JSON)'}",
                err=secure,
            )
        elif redis:
            local_redis = LocalRedis(secure=secure, tls=secure, key_prefix=redis_prefix).start()
            typer.echo(f"redis ready on port {local_redis.port}", err=secure)
        if secure:
            # One line on stdout, everything else on stderr: a script can read it with json.
            typer.echo(json.dumps(connection_document(cluster, local_redis, topic_prefix)))
        typer.echo("Ctrl-C stops everything.", err=secure)
        _wait_for_signal()
    finally:
        if local_redis is not None:
            local_redis.close()
        if cluster is not None:
            cluster.stop()


async def _provision(cluster: KafkaCluster, topics: Topics) -> None:
    options = cluster.client_options()
    await ensure_topics(
        cluster.bootstrap,
        topics,
        replication_factor=cluster.replication_factor,
        min_insync_replicas=cluster.min_insync_replicas,
        options=options,
    )
    if cluster.secure:
        await provision_acls(cluster.bootstrap, topics, options=options)


def connection_document(
    cluster: KafkaCluster | None,
    redis: LocalRedis | LocalRedisCluster | None,
    topic_prefix: str,
) -> dict[str, Any]:
    """``{"kafka_bootstrap", "redis_url", "env"}``: ``env`` maps each principal to its HOSTISO_*.

    ``env.settings`` / ``env.isolation`` / ``env.enforcer`` are complete service environments;
    ``env.platform`` is for the platform services that send isolation requests (Kafka only);
    ``env.admin`` is for tooling and tests (super user; Redis admin).
    """
    env: dict[str, dict[str, str]] = {}
    for principal in (*SERVICE_PRINCIPALS, PLATFORM_PRINCIPAL, ADMIN_PRINCIPAL):
        values = {"HOSTISO_TOPIC_PREFIX": topic_prefix}
        if cluster is not None:
            values |= cluster.client_env(principal)
        if redis is not None and (principal in SERVICE_REDIS_USERS or principal == ADMIN_PRINCIPAL):
            values["HOSTISO_REDIS_URL"] = redis.url_for(principal)
            values["HOSTISO_REDIS_PREFIX"] = redis.key_prefix
            if redis.ca_file is not None:
                values["HOSTISO_REDIS_CA_FILE"] = redis.ca_file
        env[principal] = values
    return {
        "kafka_bootstrap": cluster.bootstrap if cluster is not None else None,
        "redis_url": redis.url if redis is not None else None,
        "env": env,
    }


@app.command()
def topics(
    bootstrap: Annotated[str, typer.Option(envvar="HOSTISO_KAFKA_BOOTSTRAP")] = "127.0.0.1:9092",
    topic_prefix: Annotated[str, typer.Option(envvar="HOSTISO_TOPIC_PREFIX")] = "hostiso.",
    replication_factor: Annotated[int, typer.Option(help="1, or 3 on a 3-broker cluster")] = 1,
    security_protocol: Annotated[
        str, typer.Option(envvar="HOSTISO_KAFKA_SECURITY_PROTOCOL")
    ] = "PLAINTEXT",
    sasl_username: Annotated[str | None, typer.Option(envvar="HOSTISO_KAFKA_SASL_USERNAME")] = None,
    sasl_password: Annotated[str | None, typer.Option(envvar="HOSTISO_KAFKA_SASL_PASSWORD")] = None,
    ssl_cafile: Annotated[str | None, typer.Option(envvar="HOSTISO_KAFKA_SSL_CAFILE")] = None,
    acls: Annotated[
        bool,
        typer.Option(help="Also create the per-principal ACLs (needs a super user; SASL only)"),
    ] = True,
) -> None:
    """Create the missing topics (and, on a SASL cluster, the ACLs) of a prefix (docker compose)."""
    if security_protocol.startswith("SASL_") and not (sasl_username and sasl_password):
        raise typer.BadParameter(
            "HOSTISO_KAFKA_SASL_USERNAME and HOSTISO_KAFKA_SASL_PASSWORD are required with "
            f"HOSTISO_KAFKA_SECURITY_PROTOCOL={security_protocol}"
        )
    options = kafka_security_options(
        security_protocol, username=sasl_username, password=sasl_password, cafile=ssl_cafile
    )
    prefixed = Topics(topic_prefix)

    async def provision() -> tuple[list[str], int]:
        created = await ensure_topics(
            bootstrap,
            prefixed,
            replication_factor=replication_factor,
            min_insync_replicas=2 if replication_factor >= 3 else None,
            options=options,
        )
        bindings = 0
        if acls and security_protocol.startswith("SASL_"):
            bindings = len(await provision_acls(bootstrap, prefixed, options=options))
        return created, bindings

    created, bindings = asyncio.run(provision())
    typer.echo(f"created {len(created)} topics: {', '.join(created) or '-'}; {bindings} ACLs")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
