"""Smoke runs of the reduced bench and chaos."""
