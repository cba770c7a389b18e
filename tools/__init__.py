"""Developer tooling: document generators and the like; not part of any deployable package."""
