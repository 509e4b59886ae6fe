#!/usr/bin/env bash
# Run the whole test suite. First installs what the tests need: the Python packages into .venv, a pinned
# helm (and kubectl) into .tools/bin (ci/install-helm.sh; HELM=/path/to/helm uses yours instead), and
# redis-server and prometheus with apt-get (ci/install-system-deps.sh: needs root or sudo when missing).
# Then the lint, format and type gates (ruff, mypy --strict), then pytest. Extra arguments go to pytest (e.g. -k streaming).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh --test
bash ci/install-system-deps.sh
if [ -z "${HELM_BIN:-}" ]; then
  HELM_BIN="$(bash ci/install-helm.sh)"  # the chart tests run the helm that $HELM_BIN names
  export HELM_BIN
fi
.venv/bin/ruff check gateway_app tests bench
.venv/bin/ruff format --check gateway_app tests bench
.venv/bin/mypy  # --strict on gateway_app/ (pyproject.toml)
exec .venv/bin/python -m pytest "$@"
