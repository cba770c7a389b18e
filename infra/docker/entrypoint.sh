#!/bin/sh
# Entry point of the hostiso image: each container is its own instance. HOSTISO_INSTANCE_ID
# (client ids, the relay lease holder, a static group member id) defaults to the container's
# hostname, which Docker sets to the container id, so `docker compose up --scale isolation=3`
# gives three distinct ids without any configuration.
set -eu
if [ -z "${HOSTISO_INSTANCE_ID:-}" ]; then
  HOSTISO_INSTANCE_ID="${HOSTNAME:-$(hostname)}"
fi
export HOSTISO_INSTANCE_ID
exec "$@"
