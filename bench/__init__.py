"""Benchmarks and fault injection on the real Kafka and Redis (``make bench``, ``make chaos``)."""
