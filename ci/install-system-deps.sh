#!/usr/bin/env bash
# Debian packages the tests need: redis-server (shared rate-limit counters) and prometheus (a real
# Prometheus server and promtool, for the dashboard and alert-rule tests). Installs only what is
# missing, with apt-get, as root or through sudo. Where that cannot run (no apt-get, or neither root
# nor sudo), it names what to install by hand and exits 1.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

cannot_install() {  # cannot_install WHY
  {
    echo "install-system-deps.sh: the tests need ${missing[*]} (the commands redis-server and promtool), but $1."
    echo "Install them by hand, then run ci/test.sh again:"
    echo "  Debian/Ubuntu:  sudo apt-get install ${missing[*]}"
    echo "  elsewhere:      your package manager's redis and prometheus (promtool comes with prometheus)"
  } >&2
  exit 1
}

command -v apt-get >/dev/null || cannot_install "apt-get is not available here"
as_root=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || cannot_install "this user is not root and sudo is not available"
  as_root="sudo"
fi

echo "Installing ${missing[*]} with ${as_root:+sudo }apt-get..." >&2
$as_root apt-get update -qq >/dev/null \
  || cannot_install "'${as_root:+sudo }apt-get update' failed (see above)"
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || cannot_install "'${as_root:+sudo }apt-get install' failed (see above)"
