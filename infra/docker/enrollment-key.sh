#!/bin/sh
# One-shot (compose `enrollment-key`): an enrollment key of $AGENTS_ACCOUNT for the simulated
# agents, issued by the enforcer's API (POST /v1/accounts/{account}/enrollment-keys, which
# revokes earlier keys) with a five-minute soc token, written 0600 to the shared key volume.
# Kept if the volume already has one: enrolled agents keep their own token, and a restart of the
# stack must not revoke the key that the agents may still need to re-enroll.
# `hostiso token` mints only in dev mode (HOSTISO_DEV=1, the compose default); outside it, put
# your key into the volume yourself (docs: README "With Docker") and this job keeps it.
set -eu
key_file="${ENROLLMENT_KEY_FILE:-/var/lib/hostiso/keys/enrollment.key}"
if [ -s "$key_file" ]; then
  echo "kept the enrollment key in $key_file"
  exit 0
fi
umask 077
HOSTISO_TOKEN="$(hostiso token --role soc --sub compose-enrollment-key --ttl 300)"
export HOSTISO_TOKEN
hostiso enrollment-key rotate --account "${AGENTS_ACCOUNT:?set AGENTS_ACCOUNT}" > "$key_file.tmp"
mv "$key_file.tmp" "$key_file"
echo "issued an enrollment key of ${AGENTS_ACCOUNT} into $key_file"
