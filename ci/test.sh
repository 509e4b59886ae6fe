#!/usr/bin/env bash
# Run the whole test suite: installs what the tests need (Python packages, a pinned helm) first.
# Extra arguments go to pytest (e.g. -k streaming).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh --test
bash ci/install-helm.sh >/dev/null
bash ci/install-system-deps.sh
exec .venv/bin/python -m pytest "$@"
