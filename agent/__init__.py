"""The reference endpoint agent."""
