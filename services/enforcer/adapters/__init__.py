"""Redis stores, the pub/sub wake-up hub and the Kafka publisher of the enforcer."""
