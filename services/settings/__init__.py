"""Settings service: each account's Tooling Allowlist, its guardrails and its change events."""
