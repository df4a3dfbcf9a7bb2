#!/usr/bin/env bash
# Install saeforge with its test extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "[test]"
exec ${PYTHON:-python3} -m pytest -q -ra --durations=15 "$@"
