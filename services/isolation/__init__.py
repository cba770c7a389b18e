"""Isolation service: frozen snapshots, strict precedence, sequences and live status per endpoint."""
