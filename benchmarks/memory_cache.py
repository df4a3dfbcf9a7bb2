#!/usr/bin/env python
"""Peak memory of training from a cache does not grow with the cache (issue 7).

Writes synthetic activation caches of the given sizes in the cache format of
``saeforge.activations.cache`` (float32 ``acts.<hook>`` shards of ``--shard-tokens`` rows, plus the
manifest with sha256 checksums), then trains the same TopK SAE (default d = 768, m = 16384, k = 32,
batch 4096) for one full epoch over each cache with the real :class:`saeforge.train.trainer.Trainer`
and :class:`saeforge.activations.stream.CachedStream`, each in its own subprocess. The SAE's training
forward is the trainer's default sparse-kernel one (``--dense``: ``TrainConfig(kernels="dense")``).

Prints one JSON line per cache (peak RSS from ``getrusage``, RSS sampled through training, steps,
tokens, seconds) and a summary line with the peak-RSS difference, which should stay under 200 MB with
every peak under 3 GB. The caches are deleted at the end unless ``--keep``.

    python benchmarks/memory_cache.py                      # 1 GB and 8 GB, full epochs
    python benchmarks/memory_cache.py --sizes-gb 0.25 1 --max-steps 20   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOOK = "blocks.0.hook_resid_post"


def write_synthetic_cache(path: Path, n_tokens: int, d: int, shard_tokens: int, seed: int = 0) -> dict:
    """A complete cache folder of ``n_tokens`` float32 rows (low-rank signal plus noise)."""
    import torch

    from saeforge.activations.cache import FORMAT, MANIFEST
    from saeforge.io import save_safetensors_atomic, sha256_bytes, write_json_atomic

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=g) / 8
    shards, done, ctx = [], 0, 0
    context_len = 128
    while done < n_tokens:
        rows = min(shard_tokens, n_tokens - done)
        acts = torch.randn(rows, 64, generator=g) @ basis + 0.1 * torch.randn(rows, d, generator=g)
        pos = torch.arange(done, done + rows) % context_len
        tensors = {f"acts.{HOOK}": acts.float(), "token_id": torch.randint(0, 512, (rows,), generator=g, dtype=torch.int32),
                   "doc": (torch.arange(done, done + rows) // 1000).long(), "pos": pos.int()}
        name = f"shard_{len(shards):05d}.safetensors"
        data = save_safetensors_atomic(path / name, tensors)
        n_ctx = -(-rows // context_len)
        shards.append({"file": name, "rows": rows, "sha256": sha256_bytes(data), "first_context": ctx, "n_contexts": n_ctx})
        del data, tensors, acts
        done += rows
        ctx += n_ctx
    manifest = {
        "format": FORMAT, "saeforge_version": "benchmark",
        "config": {"model": "synthetic", "data": "synthetic", "hooks": [HOOK], "seed": seed, "shard_tokens": shard_tokens},
        "model": {"family": "synthetic", "spec": "synthetic", "d_model": d, "n_layers": 1},
        "hooks": [HOOK], "d": {HOOK: d}, "dtype": "float32", "context_len": context_len, "batch_contexts": 1,
        "shard_batches": 1, "data": "synthetic", "n_tokens": done, "n_contexts": ctx, "shards": shards, "complete": True,
    }
    write_json_atomic(path / MANIFEST, manifest)
    return manifest


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def train_once(c: dict) -> dict:
    """Child process: one epoch over the cache; returns the memory record."""
    import torch

    from saeforge.activations.stream import CachedStream
    from saeforge.kernels.allocator import tune_cpu_allocator
    from saeforge.sae import create_sae, make_config
    from saeforge.train.config import TrainConfig
    from saeforge.train.trainer import Trainer

    if c["tune_malloc"]:
        tune_cpu_allocator()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, _rss_mb()))
            stop.wait(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rss_start = _rss_mb()
    stream = CachedStream(c["cache"], batch_size=c["batch"], epochs=1, seed=0, device="cpu")
    n_tokens = stream.cache.n_tokens
    tokens = n_tokens if not c["max_steps"] else min(n_tokens, c["max_steps"] * c["batch"])
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=c["d"], d_sae=c["m"], k=c["k"], hook=HOOK))
    cfg = TrainConfig(total_tokens=tokens, batch_size=c["batch"], log_every=50, checkpoint_every=0,
                      device="cpu", dtype="auto", init_tokens=min(16384, n_tokens), seed=0,
                      kernels="dense" if c["dense"] else "sparse")
    out = Path(c["out"])
    Trainer({"": sae}, stream, cfg, out).fit(progress=False)
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join()
    rss = [r for _, r in samples]
    steps = -(-tokens // c["batch"])
    return {
        "cache_gb": round(c["bytes"] / 1e9, 3), "cache_tokens": n_tokens, "trained_tokens": tokens, "steps": steps,
        "d": c["d"], "m": c["m"], "k": c["k"], "batch": c["batch"], "sparse_forward": not c["dense"],
        "malloc_tuned": c["tune_malloc"], "threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_sampled_max_mb": round(max(rss), 1) if rss else None,
        "rss_at_quartiles_mb": [round(rss[min(len(rss) - 1, int(q * (len(rss) - 1)))], 1) for q in (0.25, 0.5, 0.75, 1.0)] if rss else [],
        "seconds": round(elapsed, 1), "s_per_step": round(elapsed / max(steps, 1), 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 8.0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--shard-tokens", type=int, default=65536, help="rows per shard (the harvester's default)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: one full epoch)")
    p.add_argument("--dir", default=None, help="where to write the caches (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic caches")
    p.add_argument("--dense", action="store_true", help="TrainConfig(kernels='dense'): plain autograd step")
    p.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                   help="skip saeforge.kernels.allocator.tune_cpu_allocator() (the CLI calls it)")
    p.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "inherit"], default="PASSIVE",
                   help="OMP_WAIT_POLICY of the training runs (see benchmarks/train_step.py)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(train_once(json.loads(a.one))), flush=True)
        return
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="saeforge_memcache_"))
    root.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        for gb in a.sizes_gb:
            n_tokens = int(gb * 1e9 / (a.d * 4))
            cache = root / f"cache_{gb:g}gb"
            t0 = time.perf_counter()
            if not (cache / "manifest.json").exists():
                write_synthetic_cache(cache, n_tokens, a.d, a.shard_tokens)
            write_s = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in cache.glob("shard_*.safetensors"))
            c = {"cache": str(cache), "bytes": size, "d": a.d, "m": a.m, "k": a.k, "batch": a.batch,
                 "max_steps": a.max_steps, "dense": a.dense, "tune_malloc": a.tune_malloc, "out": str(root / f"run_{gb:g}gb")}
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if a.omp_wait_policy != "inherit":
                env["OMP_WAIT_POLICY"] = a.omp_wait_policy
            r = subprocess.run([sys.executable, __file__, "--one", json.dumps(c)], capture_output=True, text=True,
                               env=env)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode != 0 or not lines:
                rec = {"cache_gb": round(size / 1e9, 3), "error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
            else:
                rec = json.loads(lines[-1])
                rec["cache_write_s"] = round(write_s, 1)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            shutil.rmtree(root / f"run_{gb:g}gb", ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    ok = [r for r in records if "peak_rss_mb" in r]
    if len(ok) >= 2:
        peaks = [r["peak_rss_mb"] for r in ok]
        diff = max(peaks) - min(peaks)
        print(json.dumps({"summary": "peak RSS vs cache size", "cache_gb": [r["cache_gb"] for r in ok],
                          "peak_rss_mb": peaks, "peak_rss_diff_mb": round(diff, 1),
                          "pass_diff_under_200mb": diff < 200, "pass_all_under_3gb": max(peaks) < 3072}), flush=True)


if __name__ == "__main__":
    main()
