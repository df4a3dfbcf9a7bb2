#!/usr/bin/env python
"""Scaling law of TopK SAEs on stories260K ``resid_post.2`` (Gao et al. 2024 §3; issue 4 point 6).

1. harvest ``resid_post.2`` activations of TinyStories train (``--train-tokens``) and valid
   (``--heldout-tokens``) into activation caches (resumable; reused when already there);
2. train one TopK SAE per (width n, k) of the grid -- all of them from the same shuffled passes over the
   cache (``--epochs``; the Trainer holds a dict of SAEs);
3. measure each SAE's held-out normalised MSE (FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the valid tokens);
4. fit L(n, k) = exp(α + β_k log k + β_n log n + γ log k log n) + exp(ζ + η log k) with 95% intervals and
   plot L against n and k.

Writes ``OUT/points.json``, ``OUT/fit.json``, ``OUT/scaling.png`` (and the caches and SAEs under ``OUT``).

    python benchmarks/scaling_sweep.py                       # 4 widths x 4 k, all of train.txt (~465k), 4 epochs
    python benchmarks/scaling_sweep.py --widths 256,512,1024 --k 4,8,16 --train-tokens 1M --out /tmp/sweep
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def _size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def harvest_once(model: str, data: Path, hook: str, out: Path, max_tokens: int, device: str) -> Path:
    from saeforge.activations.cache import HarvestConfig, harvest

    cfg = HarvestConfig(model=model, data=str(data), hooks=[hook], out=str(out), context_len=128,
                        max_tokens=max_tokens, device=device)
    return harvest(cfg, progress=True)


def heldout_fvu(sae, cache_dir: Path, hook: str, device: str) -> float:
    from saeforge.activations.cache import ActivationCache
    from saeforge.eval.recon import ReconStats, encode_decode

    cache = ActivationCache(cache_dir)
    stats = ReconStats(sae.cfg.d_out)
    for i in range(cache.n_shards):
        x = cache.shard(i, [hook])[f"acts.{hook}"].float().to(device)
        for s in range(0, x.shape[0], 8192):
            f, x_hat = encode_decode(sae, x[s:s + 8192])
            stats.update(x[s:s + 8192], x_hat, f)
    return float(stats.result()["fvu"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K" / "stories260K.bin"))
    ap.add_argument("--train-data", default=str(SHARED / "data" / "tinystories" / "train.txt"))
    ap.add_argument("--heldout-data", default=str(SHARED / "data" / "tinystories" / "valid.txt"))
    ap.add_argument("--hook", default="resid_post.2")
    ap.add_argument("--widths", default="256,512,1024,2048")
    ap.add_argument("--k", default="4,8,16,32")
    ap.add_argument("--train-tokens", default="4M", help="harvested training tokens (at most the file's ~465k)")
    ap.add_argument("--epochs", type=int, default=4, help="passes over the training cache")
    ap.add_argument("--heldout-tokens", default="200K")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bootstrap", type=int, default=0, help="bootstrap refits for the intervals (0: Gauss-Newton)")
    ap.add_argument("--out", default=str(REPO / "runs" / "scaling_sweep"))
    args = ap.parse_args(argv)

    import torch

    from saeforge.activations.stream import CachedStream
    from saeforge.eval.scaling import fit_scaling_law, plot_scaling
    from saeforge.io import write_json_atomic
    from saeforge.sae.base import make_config
    from saeforge.train.config import TrainConfig
    from saeforge.train.trainer import Trainer

    out = Path(args.out)
    widths = [int(w) for w in args.widths.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    n_train, n_held = _size(args.train_tokens), _size(args.heldout_tokens)
    t0 = time.time()
    train_cache = harvest_once(args.model, Path(args.train_data), args.hook, out / "cache_train", n_train, args.device)
    held_cache = harvest_once(args.model, Path(args.heldout_data), args.hook, out / "cache_heldout", n_held,
                              args.device)
    t_harvest = time.time() - t0

    stream = CachedStream(train_cache, batch_size=args.batch_size, hooks=[args.hook], epochs=args.epochs, seed=0,
                          device=args.device)
    d = stream.d[args.hook]
    saes = {f"topk_w{n}_k{k}": make_config("topk", d_in=d, d_sae=n, k=k, hook=args.hook, model=args.model)
            for n in widths for k in ks if k <= n}
    n_rows = stream.cache.n_tokens
    cfg = TrainConfig(total_tokens=n_rows * args.epochs, batch_size=args.batch_size, device=args.device,
                      dead_tokens=max(n_rows // 10, 10_000), checkpoint_every=0, log_every=100)
    t0 = time.time()
    trained = Trainer(saes, stream, cfg, out / "saes").fit(progress=True)
    t_train = time.time() - t0

    points = []
    with torch.no_grad():
        for name, sae in trained.items():
            sae.eval()
            fvu = heldout_fvu(sae, held_cache, args.hook, args.device)
            points.append({"name": name, "n": sae.cfg.d_sae, "k": sae.cfg.k, "loss": fvu})
            print(f"{name:>20s}  held-out normalised MSE {fvu:.4f}")
    fit = fit_scaling_law(points, bootstrap=args.bootstrap)
    fit["timing_s"] = {"harvest": round(t_harvest, 1), "train": round(t_train, 1)}
    from saeforge.activations.cache import ActivationCache

    fit["train_tokens"], fit["epochs"] = n_rows, args.epochs
    fit["heldout_tokens"] = ActivationCache(held_cache).n_tokens
    write_json_atomic(out / "points.json", points)
    write_json_atomic(out / "fit.json", fit)
    plot_scaling(fit, points, out / "scaling.png")
    print(json.dumps({"params": fit["params"], "ci95": fit["ci95"], "r2": fit["r2"]}, indent=1))
    print(f"wrote {out / 'fit.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
