"""Adapters of the isolation service: Redis store, Kafka replicas and publisher, settings client."""
