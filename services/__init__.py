"""The three services of the host isolation control plane."""
