#!/usr/bin/env bash
# Installs the system packages the project needs when they are missing (as root, Debian/Ubuntu):
# redis-server, Java and Maven for the Kafka broker, nftables and iproute2 for the agent tests,
# chromium for the portal's browser tests, promtool (Debian's prometheus package) for the alert
# rules' tests (docs/prometheus).
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
# promtool checks and unit-tests docs/prometheus/alerts.yml; the package's server is not needed
# (its service is not started without systemd; elsewhere `systemctl disable --now prometheus`).
command -v promtool >/dev/null || missing+=(prometheus)
# the portal's browser tests drive Debian's Chromium (Playwright cannot download its own here)
[ "${HOSTISO_SKIP_CHROMIUM:-0}" = "1" ] || command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "missing system packages: ${missing[*]} — install them (e.g. sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
