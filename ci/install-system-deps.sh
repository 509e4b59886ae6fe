#!/usr/bin/env bash
# Debian packages the tests need: redis-server (shared rate-limit counters) and prometheus (a real
# Prometheus server and promtool, for the dashboard and alert-rule tests). Installs only what is
# missing; needs root or sudo when something is missing.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "Installing ${missing[*]} with apt-get..." >&2
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
