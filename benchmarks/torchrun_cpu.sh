#!/usr/bin/env bash
# Data parallel on this CPU: `torchrun --nproc-per-node 2` (gloo, 1 thread each) against one process with
# 2 threads, same job (the demo's TopK SAE: d=64 from stories260K resid_post.2, 1024 latents, k=16, global
# batch 4096). Prints tokens/s of both (from the last metrics line: tokens / elapsed_s, the training loop only)
# and rank 0's time inside collectives per step (comm_s / steps; gloo is synchronous, so this includes
# waiting for the other rank). Needs ../shared. Usage: bash benchmarks/torchrun_cpu.sh [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-2M}
OUT=${OUT:-runs/torchrun_cpu}
M=../shared/models/stories260K/stories260K.bin
PY=${PYTHON:-python}
mkdir -p "$OUT"
if [ ! -f "$OUT/cache/manifest.json" ]; then
  OMP_NUM_THREADS=2 "$PY" -m saeforge harvest --model "$M" --data ../shared/data/tinystories/train.txt \
    --hooks resid_post.2 --out "$OUT/cache" --max-tokens 500000 --quiet
fi
ARGS=(train --data "$OUT/cache" --arch topk --width 1024 --k 16 --tokens "$TOKENS" --batch-size 4096 --lr 1e-3
      --dtype float32 --device cpu --dead-tokens 1M --log-every 25 --checkpoint-every 0 --no-progress)
rm -rf "$OUT/one" "$OUT/two"
# PASSIVE: on a machine shared with other jobs, spinning OpenMP workers of a 2-thread process lose their time
# slices to the busy cores (docs/performance.md); the 1-thread ranks below do not spin at all
OMP_NUM_THREADS=2 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} "$PY" -m saeforge "${ARGS[@]}" --out "$OUT/one" > /dev/null
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \
  --master-port "$("$PY" -c 'from saeforge.distributed.launch import free_port; print(free_port())')" \
  -m saeforge "${ARGS[@]}" --out "$OUT/two" > /dev/null 2>&1
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rec = {}
for name in ("one", "two"):
    last = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
    rec[name] = {"tokens": last["tokens"], "steps": last["step"], "elapsed_s": last["elapsed_s"],
                 "tokens_per_s": round(last["tokens"] / last["elapsed_s"]), "fvu": round(last["fvu"], 4)}
    if "comm_s" in last:
        rec[name]["comm_s"] = last["comm_s"]
        rec[name]["comm_ms_per_step"] = round(1000 * last["comm_s"] / last["step"], 2)
        rec[name]["step_ms"] = round(1000 * last["elapsed_s"] / last["step"], 2)
rec["ratio_two_over_one"] = round(rec["two"]["tokens_per_s"] / rec["one"]["tokens_per_s"], 3)
print(json.dumps(rec))
PYEOF
