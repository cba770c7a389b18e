"""The ``hostiso`` operator CLI: the Tooling Allowlist, isolations, dev tokens and local infrastructure."""
