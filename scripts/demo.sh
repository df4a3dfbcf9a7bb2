#!/usr/bin/env bash
# The main job on ../shared's stories260K model and TinyStories text: harvest -> train -> evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec ${PYTHON:-python3} -m saeforge demo --shared ../shared --out runs/demo "$@"
