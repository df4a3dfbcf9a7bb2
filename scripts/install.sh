#!/usr/bin/env bash
# Install saeforge and what it needs. torch is pinned only when missing, to the CPU wheel these machines
# carry locally (an unpinned `torch` would pull gigabytes of CUDA wheels); GPU users keep their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"
fi
# the distribution was renamed saeforge -> saeforge-toolkit (PyPI refuses the old name); drop an old install
if $PY -m pip show -q saeforge >/dev/null 2>&1; then
  $PY -m pip uninstall -q -y saeforge
fi
$PY -m pip install -q -e ".${extra}"
