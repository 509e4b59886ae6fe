#!/usr/bin/env bash
# Run the gateway on this machine in front of simulated vLLM and SGLang engines (no GPU needed).
# Extra arguments go to `llm-gateway demo` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
exec .venv/bin/llm-gateway demo "$@"
