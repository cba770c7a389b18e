"""Enforcer service: agent enrollment, the desired signed policy per endpoint, and long-poll delivery."""
