#!/usr/bin/env bash
# Create .venv with the project installed (and its test tools with --test). Safe to run again:
# it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "llm-gateway needs Python 3.11 or newer (found: $("$python" --version 2>&1))." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || {
    echo "Could not create a virtual environment. On Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 1
  }
fi
stamp=".venv/.installed${extras}-$("$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()[:16])' pyproject.toml)"
if [ ! -f "$stamp" ]; then
  echo "Installing llm-gateway${extras} into .venv (once; the log is .venv/install.log)..." >&2
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".${extras}"; } \
      >.venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2
    echo "Installing failed; the whole log is .venv/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
