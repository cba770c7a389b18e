"""The project's shared package: message contracts, topic names, config and infrastructure helpers."""
