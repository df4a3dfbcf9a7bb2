"""Cache bytes read per process under data parallelism: ``--dp-read exact`` against ``--dp-read disjoint``.

``python benchmarks/dp_read_io.py [--tokens 200000] [--ranks 2]`` harvests a small cache of stories260K
``resid_post.2`` (once, into runs/dp_read_io/cache), then for each mode starts ``--ranks`` gloo processes that train
the same TopK SAE for two epochs of the cache (global batch 4096) and count, on every rank, what
``ActivationCache.shard`` loads: shard files opened (their bytes on disk) and the bytes of the tensors it
returns. Prints one JSON line per mode and rank, then a summary. Needs ../shared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
sys.path.insert(0, str(REPO))


def rank_main(cache: str, mode: str, out: str) -> None:
    import torch

    from saeforge import distributed as dist
    from saeforge.activations.cache import ActivationCache
    from saeforge.activations.stream import CachedStream
    from saeforge.sae import make_config
    from saeforge.train import TrainConfig, Trainer

    counts = {"shards": 0, "file_bytes": 0, "tensor_bytes": 0}
    real = ActivationCache.shard

    def counted(self, i, hooks=None):
        out = real(self, i, hooks)
        counts["shards"] += 1
        counts["file_bytes"] += (self.path / self.manifest["shards"][i]["file"]).stat().st_size
        counts["tensor_bytes"] += sum(t.nbytes for t in out.values())
        return out

    ActivationCache.shard = counted
    at_init = {}
    real_init = Trainer.init_from_data

    def init(self, batch):  # what the data-dependent init read (the exact stream's first buffer, on every rank)
        at_init.update(counts)
        return real_init(self, batch)

    Trainer.init_from_data = init
    dist.init("cpu")
    stream = CachedStream(cache, batch_size=4096, shuffle_buffer=65536, seed=0)
    n = stream.cache.n_tokens
    cfg = TrainConfig(total_tokens=EPOCHS * n, batch_size=4096, lr=1e-3, device="cpu", dtype="float32", log_every=10,
                      checkpoint_every=0, dp_read=mode)
    t0 = time.perf_counter()
    Trainer({"": make_config("topk", d_in=stream.d["resid_post.2"], d_sae=1024, k=16)}, stream, cfg,
            Path(out) / mode).fit(progress=False)
    rec = {"mode": mode, "rank": dist.rank(), "world": dist.world_size(), "cache_rows": n,
           "cache_shards": stream.cache.n_shards, "seconds": round(time.perf_counter() - t0, 2), **counts,
           "init_file_bytes": at_init["file_bytes"], "train_file_bytes": counts["file_bytes"] - at_init["file_bytes"],
           "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(rec), flush=True)
    dist.destroy()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "dp_read_io"))
    ap.add_argument("--rank-main", nargs=3, metavar=("CACHE", "MODE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_main:
        rank_main(*a.rank_main)
        return 0
    from saeforge.cli import main as cli
    from saeforge.distributed.launch import launch

    out = Path(a.out)
    cache = out / "cache"
    if not (cache / "manifest.json").exists():
        shared = REPO.parent / "shared"
        assert cli(["harvest", "--model", str(shared / "models/stories260K/stories260K.bin"), "--data",
                    str(shared / "data/tinystories/train.txt"), "--hooks", "resid_post.2", "--out", str(cache),
                    "--max-tokens", str(a.tokens), "--shard-tokens", "16384", "--quiet"]) == 0
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    recs = []
    import shutil

    shutil.rmtree(out / "runs", ignore_errors=True)
    for mode in ("exact", "disjoint"):
        res = launch(a.ranks, [sys.executable, __file__, "--rank-main", str(cache), mode, str(out / "runs")],
                     timeout=900, env=env)
        for r in res:
            assert r.returncode == 0, r.stdout[-3000:]
            for line in r.stdout.splitlines():
                if line.startswith("RESULT "):
                    recs.append(json.loads(line[7:]))
                    print(line[7:])
    for mode in ("exact", "disjoint"):
        rs = [r for r in recs if r["mode"] == mode]
        print(f"{mode}: per rank {[r['file_bytes'] for r in rs]} shard-file bytes "
              f"(init {[r['init_file_bytes'] for r in rs]}, training {[r['train_file_bytes'] for r in rs]}), "
              f"{[r['shards'] for r in rs]} shard loads, {[r['seconds'] for r in rs]} s; total "
              f"{sum(r['file_bytes'] for r in rs)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
