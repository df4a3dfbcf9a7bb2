#!/usr/bin/env python
"""How much of the spliced-SAE cross-entropy gap does a LoRA adapter close, per rank? (issue 5)

The setting of the issue's acceptance test: the llama2.c model stories260K (dim 64, 5 blocks), a TopK SAE
(width 1024, k 16) spliced at ``resid_post.2``, LoRA adapters on every q/k/v/o/gate/up/down projection
trained on KL(clean ‖ spliced + LoRA) over TinyStories ``train.txt`` (Chen, Engels & Tegmark 2025,
arXiv:2501.19406), and the report of :func:`saeforge.adapt.adapt_report` on the first ``--eval-tokens``
tokens of ``valid.txt``:

    L_base       CE of the clean model
    L_SAE        CE with the SAE spliced in (no adapter)
    L_SAE+LoRA   CE with the SAE spliced in and the adapter on
    gap closed   (L_SAE − L_SAE+LoRA) / (L_SAE − L_base)

The SAE: ``--sae PATH`` if given; else ``OUT/sae`` if an earlier run left one there; else one is trained
with :class:`saeforge.train.Trainer` from an activation cache of ``train.txt`` at the hook (``--cache``
is reused when its manifest describes the same model, data and hook, else a cache is harvested into
``OUT/cache``). ``benchmarks/adapt_vs_e2e.py`` starts from the same ``OUT/sae``.

Learning rate, schedule and budget. The paper's AdamW lr is 5e-5, constant (the CLI default), chosen for
1-2B-parameter models trained on 15M tokens. On this 260K-parameter model a sweep (docs/adapt.md) found
higher rates better and rank 1 the hardest: with a constant lr it wanders on a plateau at 21-28% of the gap.
This benchmark therefore uses the named deviations ``--lr 5e-4 --lr-schedule cosine`` (5% warm-up, cosine
decay to 0) and 4M tokens per rank (~8 passes over train.txt; about 10 CPU-minutes per rank), and records
them in every output line; ``--lr 5e-5 --lr-schedule constant`` reproduces the paper's setting.

    OMP_NUM_THREADS=1 python benchmarks/adapt_ranks.py --out runs/bench_adapt
    OMP_NUM_THREADS=1 python benchmarks/adapt_ranks.py --out runs/bench_adapt --ranks 16 --lr 5e-5 --lr-schedule constant --tokens 200k

Prints one JSON line per rank and writes ``OUT/adapt_ranks.jsonl`` and the table ``OUT/adapt_ranks.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "stories260K" / "stories260K.bin"
TRAIN = SHARED / "data" / "tinystories" / "train.txt"
VALID = SHARED / "data" / "tinystories" / "valid.txt"
HOOK = "resid_post.2"

# Chosen for this model and budget (see the module docstring); the CLI default stays the paper's 5e-5.
BENCH_LORA_LR = 5e-4


def _same_file(spec: str, want: Path, base: Path) -> bool:
    """Does the (possibly relative) path ``spec`` in a manifest name ``want``? Relative paths are tried
    against the working directory, the repository and the cache folder's parent."""
    for root in (Path.cwd(), REPO, base):
        p = Path(spec) if Path(spec).is_absolute() else root / spec
        if p.exists() and p.resolve() == want.resolve():
            return True
    return False


def reusable_cache(path: Path, model: Path, data: Path, hook: str) -> bool:
    """A complete activation cache of ``model`` on ``data`` that stores ``hook`` (float32, no specials)."""
    mf = path / "manifest.json"
    if not mf.exists():
        return False
    try:
        m = json.loads(mf.read_text())
        c = m["config"]
        return (bool(m.get("complete")) and hook in m["hooks"] and m.get("dtype") == "float32"
                and not c.get("keep_special") and _same_file(c["model"], model, path.parent)
                and _same_file(c["data"], data, path.parent))
    except (KeyError, TypeError, json.JSONDecodeError):
        return False


def ensure_sae(out: Path, sae: str | None, cache: str | None, width: int, k: int, tokens: int,
               dead_tokens: int, seed: int, progress: bool) -> tuple[str, dict]:
    """Return (path of the SAE to adapt around, how it was obtained)."""
    if sae:
        return sae, {"sae_source": "given"}
    sae_dir = out / "sae"
    if (sae_dir / "cfg.json").exists() and (sae_dir / "sae.safetensors").exists():
        info = {"sae_source": "reused", "sae_dir": str(sae_dir)}
        if (sae_dir / "metrics.jsonl").exists():  # how it was trained by an earlier run
            last = json.loads((sae_dir / "metrics.jsonl").read_text().splitlines()[-1])
            info.update(sae_train_tokens=last["tokens"], sae_train_fvu=last["fvu"], sae_train_l0=last["l0"],
                        sae_dead_frac=last["dead_frac"])
        return str(sae_dir), info
    from saeforge.activations.cache import HarvestConfig, harvest
    from saeforge.activations.stream import CachedStream
    from saeforge.sae import make_config
    from saeforge.train import TrainConfig, Trainer

    t0 = time.perf_counter()
    if cache and reusable_cache(Path(cache), MODEL, TRAIN, HOOK):
        cache_dir = Path(cache)
    else:
        cache_dir = out / "cache"
        harvest(HarvestConfig(model=str(MODEL), data=str(TRAIN), hooks=[HOOK], out=str(cache_dir)), progress=progress)
    t_harvest = time.perf_counter() - t0
    stream = CachedStream(str(cache_dir), batch_size=4096, hooks=[HOOK], seed=seed)
    cfg = make_config("topk", d_in=stream.d[HOOK], d_sae=width, k=k, hook=HOOK, model=str(MODEL))
    tcfg = TrainConfig(total_tokens=tokens, batch_size=4096, dead_tokens=dead_tokens, device="cpu",
                       dtype="float32", seed=seed, checkpoint_every=0)
    t1 = time.perf_counter()
    Trainer({"": cfg}, stream, tcfg, sae_dir).fit(progress=progress)
    last = json.loads((sae_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return str(sae_dir), {"sae_source": "trained", "sae_cache": str(cache_dir), "sae_train_tokens": tokens,
                          "sae_train_fvu": last["fvu"], "sae_train_l0": last["l0"],
                          "sae_dead_frac": last["dead_frac"], "harvest_s": round(t_harvest, 1),
                          "sae_train_s": round(time.perf_counter() - t1, 1)}


def run_rank(sae: str, rank: int, args: argparse.Namespace) -> dict:
    from saeforge.adapt import AdaptConfig, adapt_report, build, fit, save

    cfg = AdaptConfig(model=str(MODEL), saes=[sae], data=str(TRAIN), rank=rank, lr=args.lr, tokens=args.tokens,
                      lr_schedule=args.lr_schedule,
                      batch_contexts=args.batch_contexts, context_len=128, seed=args.seed, device="cpu",
                      checkpoint_every=0, log_every=25)
    run_dir = Path(args.out) / f"rank{rank}"
    ad = build(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    fit(ad, cfg, run_dir, progress=not args.no_progress)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    rep = adapt_report(ad.loaded.model, ad.loaded.tokenizer, ad.saes, ad.hooks, str(VALID), ad.adapter_off,
                       n_tokens=args.eval_tokens, context_len=128, progress=not args.no_progress)
    eval_s = time.perf_counter() - t1
    rep["eval_data"] = str(VALID)
    save(ad, cfg, run_dir, rep)
    n_lora = sum(p.numel() for n, p in ad.loaded.model.named_parameters() if "lora_" in n)
    return {
        "rank": rank, "lr": args.lr, "lr_schedule": args.lr_schedule, "alpha": cfg.alpha, "dropout": cfg.dropout, "train_tokens": args.tokens,
        "eval_tokens": rep["tokens"], "L_base": rep["ce_base"], "L_SAE": rep["ce_sae"],
        "L_SAE+LoRA": rep["ce_sae_lora"], "gap_closed": rep["gap_closed"], "kl_before": rep["kl_before"],
        "kl_after": rep["kl_after"], "ce_lora_only": rep["ce_lora_only"], "sae_fvu": rep["saes"][0]["fvu"],
        "sae_l0": rep["saes"][0]["l0"], "lora_params": n_lora, "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1), "eval_s": round(eval_s, 1), "out": str(run_dir),
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# LoRA adaptation around a TopK SAE (stories260K, resid_post.2, width 1024, k 16)", "",
        f"SAE: {meta.get('sae')} ({meta.get('sae_source')}). Eval: first {rows[0]['eval_tokens'] if rows else 0} "
        f"tokens of valid.txt. lr {rows[0]['lr'] if rows else ''} ({rows[0]['lr_schedule'] if rows else ''}), "
        "alpha 32, dropout 0.1, "
        f"{rows[0]['train_tokens'] if rows else 0} training tokens per rank.", "",
        "| rank | LoRA params | L_base | L_SAE | L_SAE+LoRA | gap closed | KL before | KL after | CE LoRA only "
        "| SAE FVU (adapted) | SAE L0 | train s (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rank']} | {r['lora_params']} | {r['L_base']:.4f} | {r['L_SAE']:.4f} | {r['L_SAE+LoRA']:.4f} "
            f"| {r['gap_closed']:.1%} | {r['kl_before']:.4f} | {r['kl_after']:.4f} | {r['ce_lora_only']:.4f} "
            f"| {r['sae_fvu']:.4f} | {r['sae_l0']:.2f} | {r['train_s']:.0f} / {r['train_cpu_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from saeforge.config import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_adapt", help="output folder (the SAE goes to OUT/sae)")
    p.add_argument("--sae", help="SAE to adapt around (default: OUT/sae, trained if missing)")
    p.add_argument("--cache", default="/tmp/demo_cache",
                   help="activation cache to reuse for training the SAE when its manifest matches")
    p.add_argument("--sae-tokens", default="2M", help="SAE training tokens when one is trained")
    p.add_argument("--dead-tokens", default="1M", help="dead-latent window of the SAE training")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--ranks", default="1,4,16", help="comma-separated LoRA ranks")
    p.add_argument("--lr", type=float, default=BENCH_LORA_LR,
                   help="AdamW lr of the adapter (the paper and the CLI use 5e-5; see the docstring)")
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine", "linear"],
                   help="adapter lr schedule (constant: the paper's; cosine: this benchmark's default)")
    p.add_argument("--tokens", default="4M", help="adaptation tokens per rank (~10 CPU-minutes each)")
    p.add_argument("--batch-contexts", type=int, default=8, help="contexts of 128 tokens per step")
    p.add_argument("--eval-tokens", default="50k", help="valid.txt tokens for the report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark machine is shared)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.tokens, args.eval_tokens = parse_size(args.tokens), parse_size(args.eval_tokens)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sae, meta = ensure_sae(out, args.sae, args.cache, args.width, args.k, parse_size(args.sae_tokens),
                           parse_size(args.dead_tokens), args.seed, not args.no_progress)
    meta["sae"] = sae
    print(json.dumps({"sae": meta}), flush=True)
    rows = []
    for r in [int(x) for x in args.ranks.split(",") if x]:
        row = run_rank(sae, r, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(out / "adapt_ranks.jsonl", "w") as fh:
        fh.write(json.dumps({"sae": meta, "argv": sys.argv[1:] if argv is None else argv}) + "\n")
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    (out / "adapt_ranks.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
