"""Adapters of the settings service: the Redis store and outbox, the Kafka relay and audit sink."""
