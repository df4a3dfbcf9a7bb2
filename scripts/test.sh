#!/usr/bin/env bash
# Install saeforge with its test extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "[test]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: threads only add contention
exec ${PYTHON:-python3} -m pytest -q -ra --durations=15 "$@"
