#!/usr/bin/env python
"""What read-time verification of cache shards costs (issue 13).

Every shard read by ``ActivationCache.shard`` is checked against the manifest's sha256 and for NaN/Inf rows
(on by default; ``SAEFORGE_VERIFY_CACHE=0`` or ``cache.verify_reads = False`` turns it off). This writes a
synthetic float32 cache of ``--size-gb`` (the format of ``benchmarks/memory_cache.py``), then, in one
process and alternating the two settings ``--repeats`` times so that a shared machine's load hits both alike:

* ``read``: one epoch of ``CachedStream`` batches with no training (the worst case: verification is all
  the extra work there is);
* ``train``: one epoch of TopK training (``--width``, ``--k``, batch 4096) with the real ``Trainer``.

Prints one JSON line per run and a summary line with the median tokens/s of each setting and the ratio
with/without (1.0 = free), plus the load average before and after.

    python benchmarks/cache_verify.py                 # 1 GB, d=768, width 4096, k=32
    python benchmarks/cache_verify.py --size-gb 0.25  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def read_epoch(cache: Path, verify: bool, batch: int) -> dict:
    from saeforge.activations.stream import CachedStream

    stream = CachedStream(cache, batch_size=batch, epochs=1, seed=0)
    stream.cache.verify_reads = verify
    t0 = time.perf_counter()
    rows = sum(len(b) for b in stream.iterate())
    dt = time.perf_counter() - t0
    return {"mode": "read", "verify": verify, "tokens": rows, "seconds": round(dt, 3), "tok_per_s": round(rows / dt)}


def train_epoch(cache: Path, verify: bool, batch: int, width: int, k: int, out: Path) -> dict:
    import torch

    from saeforge.activations.stream import CachedStream
    from saeforge.sae import make_config
    from saeforge.train import TrainConfig, Trainer

    stream = CachedStream(cache, batch_size=batch, epochs=None, seed=0)
    stream.cache.verify_reads = verify
    n = stream.cache.n_tokens
    d = next(iter(stream.d.values()))
    cfg = make_config("topk", d_in=d, d_sae=width, k=k)
    tc = TrainConfig(total_tokens=n, batch_size=batch, checkpoint_every=0, log_every=50, device="cpu",
                     dtype="float32", seed=0)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    Trainer({"": cfg}, stream, tc, out).fit(progress=False)
    dt = time.perf_counter() - t0
    return {"mode": "train", "verify": verify, "tokens": n, "seconds": round(dt, 3), "tok_per_s": round(n / dt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--shard-tokens", type=int, default=65536)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--dir", help="where to write the cache (default: a temp folder, deleted at the end)")
    args = ap.parse_args()

    from memory_cache import write_synthetic_cache

    import torch

    root = Path(args.dir or tempfile.mkdtemp(prefix="cache_verify_"))
    cache = root / "cache"
    n_tokens = int(args.size_gb * 1e9 / (4 * args.d))
    load_before = os.getloadavg()
    if not (cache / "manifest.json").exists():
        write_synthetic_cache(cache, n_tokens, args.d, args.shard_tokens)
    size = sum(p.stat().st_size for p in cache.iterdir())
    runs = []
    try:
        read_epoch(cache, True, args.batch)  # warm the page cache: both settings then read from memory
        for _ in range(args.repeats):
            for verify in (False, True):
                runs.append(read_epoch(cache, verify, args.batch))
                print(json.dumps(runs[-1]), flush=True)
        if not args.skip_train:
            for _ in range(args.repeats):
                for verify in (False, True):
                    runs.append(train_epoch(cache, verify, args.batch, args.width, args.k, root / "sae"))
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    def med(mode: str, verify: bool) -> float | None:
        xs = [r["tok_per_s"] for r in runs if r["mode"] == mode and r["verify"] == verify]
        return statistics.median(xs) if xs else None

    summary = {"summary": True, "cache_bytes": size, "rows": n_tokens, "d": args.d, "shards": -(-n_tokens // args.shard_tokens),
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    for mode in ("read", "train"):
        off, on = med(mode, False), med(mode, True)
        if off and on:
            summary[mode] = {"tok_per_s_without": off, "tok_per_s_with": on, "ratio_with_over_without": round(on / off, 3)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
