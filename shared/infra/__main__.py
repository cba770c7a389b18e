"""``python -m shared.infra``: start a local Kafka (1 or 3 nodes) and/or Redis until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Annotated

import typer

from shared.infra.kafka import KafkaCluster, ensure_kafka_jars
from shared.infra.redis import LocalRedis
from shared.kafka import ensure_topics
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
def up(
    kafka: Annotated[bool, typer.Option(help="Start Kafka")] = True,
    redis: Annotated[bool, typer.Option(help="Start Redis")] = True,
    nodes: Annotated[int, typer.Option(help="Kafka nodes: 1, or 3 for RF 3 / min ISR 2")] = 1,
    topic_prefix: Annotated[
        str, typer.Option(help="Create the topics with this prefix")
    ] = "hostiso.",
) -> None:
    """Start the infrastructure in the foreground; Ctrl-C stops it and removes its data."""
    cluster: KafkaCluster | None = None
    local_redis: LocalRedis | None = None
    try:
        if kafka:
            started = time.monotonic()
            cluster = KafkaCluster(nodes_count=nodes).start()
            asyncio.run(
                ensure_topics(
                    cluster.bootstrap,
                    Topics(topic_prefix),
                    replication_factor=cluster.replication_factor,
                    min_insync_replicas=cluster.min_insync_replicas,
                )
            )
            typer.echo(
                f"kafka ready in {time.monotonic() - started:.1f}s: HOSTISO_KAFKA_BOOTSTRAP={cluster.bootstrap}"
            )
        if redis:
            local_redis = LocalRedis().start()
            typer.echo(f"redis ready: HOSTISO_REDIS_URL={local_redis.url}")
        typer.echo("Ctrl-C stops everything.")
        _wait_for_signal()
    finally:
        if local_redis is not None:
            local_redis.close()
        if cluster is not None:
            cluster.stop()


@app.command()
def topics(
    bootstrap: Annotated[str, typer.Option(envvar="HOSTISO_KAFKA_BOOTSTRAP")] = "127.0.0.1:9092",
    topic_prefix: Annotated[str, typer.Option(envvar="HOSTISO_TOPIC_PREFIX")] = "hostiso.",
    replication_factor: Annotated[int, typer.Option(help="1, or 3 on a 3-broker cluster")] = 1,
) -> None:
    """Create the missing topics on an existing cluster (used by docker compose)."""
    created = asyncio.run(
        ensure_topics(
            bootstrap,
            Topics(topic_prefix),
            replication_factor=replication_factor,
            min_insync_replicas=2 if replication_factor >= 3 else None,
        )
    )
    typer.echo(f"created {len(created)} topics: {', '.join(created) or '-'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
