#!/usr/bin/env bash
# One call on a machine with a CUDA GPU checks every GPU path of saeforge, in under 5 minutes on one GPU:
#   1. the CUDA tests (pytest -m cuda: Triton kernels against the torch path, sparse kernels against dense on
#      CUDA, the trainer on CUDA against the CPU (fp32) and in bf16, harvest/LiveStream/eval on CUDA in bf16,
#      --device-map placement, and with two or more GPUs NCCL data parallel, latent sharding and eval/adapt
#      with --device-map balanced over two GPUs against one GPU);
#   2. a bf16 training benchmark of a TopK SAE at d = 768 and d = 2304 (m = 32·d, k = 32, batch 4096): tokens/s
#      and the fraction of the GPU's bf16 GEMM peak (measured in the same process), one JSON line each.
# Output: a summary on stdout and everything in ${OUT:-runs/gpu_check}/ (pytest.log, bench.jsonl).
# Without a GPU it says so and exits 0 (CI runs the same tests, which skip).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch; nothing to check (the cuda tests skip on CPU)"
  exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.__version__, torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
"$PY" -c "import triton; print('gpu_check: triton', triton.__version__)" 2>/dev/null || echo "gpu_check: triton missing: the Triton test skips (pip install triton)"
rc=0
echo "gpu_check: [1/2] CUDA tests (budget 180 s)"
timeout 180 "$PY" -m pytest -q -m cuda -ra tests/ 2>&1 | tee "$OUT/pytest.log" | tail -n 25
test "${PIPESTATUS[0]}" -eq 0 || rc=1
echo "gpu_check: [2/2] bf16 training step, d = 768 and 2304 (budget 100 s)"
timeout 100 "$PY" benchmarks/train_step.py --device cuda --dtype bf16 --d 768 2304 --mult 32 --k 32 --batch 4096 \
  --repeats 2 --steps 10 --time-cap 30 --peak-cap 5 > "$OUT/bench.jsonl" || rc=1
"$PY" - "$OUT/bench.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        continue
    if "d" in r:
        print(f"gpu_check: d={r['d']} m={r['m']} k={r['k']} batch={r['batch']} {r['dtype']}: "
              f"{r.get('tokens_per_s', 'n/a')} tokens/s, {r.get('achieved_gflops', 'n/a')} GFLOP/s "
              f"= {r.get('frac_of_peak', 'n/a')} of the bf16 GEMM peak ({r.get('peak_gflops', 'n/a')} GFLOP/s)")
PYEOF
echo "gpu_check: $([ $rc -eq 0 ] && echo PASSED || echo FAILED) (details in $OUT/)"
exit $rc
