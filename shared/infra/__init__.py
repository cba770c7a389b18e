"""Local infrastructure without Docker: a real Apache Kafka (KRaft) from Maven jars and redis-server."""

from shared.infra.kafka import KafkaCluster, LocalKafka, ensure_kafka_jars
from shared.infra.redis import LocalRedis, ensure_redis_server

__all__ = ["KafkaCluster", "LocalKafka", "LocalRedis", "ensure_kafka_jars", "ensure_redis_server"]
