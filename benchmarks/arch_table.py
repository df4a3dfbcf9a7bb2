#!/usr/bin/env python
"""Every architecture on stories260K's block-2 residual stream (``resid_post.2``) at matched L0 (≈ 16).

1. harvest ``resid_post.2`` activations of TinyStories train (``--train-tokens``; resumable, reused);
2. train every architecture/recipe from ONE shuffled pass over the cache (``saeforge.train.sweep``): the
   k-architectures at k = ``--l0``, the penalised ones at a few λ values each (``LAMBDAS``), because their L0
   is an outcome, not a setting;
3. evaluate all of them in one model pass on TinyStories valid (``saeforge.eval.evaluate_many``): FVU, L0,
   dead latents, CE loss recovered (spliced loss vs. zero-ablation);
4. per architecture keep the member whose L0 is closest to the target, and write the table between the
   ``arch_table`` markers of ``docs/results.md`` (and ``OUT/arch_table.json``).

All SAEs use the same learning rate (``--lr``): the recipes' own rates (5e-5 for Anthropic's, 7e-5 for
Gemma Scope's) are tuned for billion-token runs and would leave a one-million-token run untrained. Every other
constant is the recipe's (docs/recipes/).

    python benchmarks/arch_table.py                       # 500k train tokens, 30k eval tokens
    python benchmarks/arch_table.py --train-tokens 300k --eval-tokens 20k --out /tmp/arch
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
HOOK = "resid_post.2"
BEGIN, END = "<!-- arch_table:begin -->", "<!-- arch_table:end -->"

# (arch, recipe or None, extra config) -> λ values tried for the penalised architectures
K_ARCHS = [("topk", None, {}), ("batchtopk", None, {}), ("matryoshka", None, {})]
LAMBDAS = {
    ("relu", None): [2.5, 4.0, 6.0],
    ("relu", "monosemanticity"): [1.5, 2.0, 3.0],
    ("jumprelu", None): [10.0, 20.0, 40.0],
    # at this budget GDM's L0 penalty cannot move θ₀ = 0.001 (its pseudo-gradient only reaches θ, within
    # ε/2 = 0.0005 of it), so every λ gives the same SAE: one value is enough to show it
    ("jumprelu", "gemmascope"): [1.0],
    ("gated", None): [1.5, 2.0, 3.0],
}


def _size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def build(width: int, l0: int, d: dict[str, int], model: str, steps: int) -> dict:
    from saeforge.train.sweep import build_grid

    grid = {}
    for arch, recipe, extra in K_ARCHS:
        sets = {"threshold_start_step": max(1, steps // 10), "threshold_beta": 0.99} if arch != "topk" else {}
        grid.update(build_grid([arch], [width], [l0], [], d=d, hook=HOOK, sets={**sets, **extra}, recipe=recipe,
                               model=model))
    for (arch, recipe), lams in LAMBDAS.items():
        sets = {"sparsity_warmup_steps": max(1, steps // 10)} if recipe == "gemmascope" else {}
        grid.update(build_grid([arch], [width], [], lams, d=d, hook=HOOK, sets=sets, recipe=recipe, model=model))
    return grid


def family(name: str) -> str:
    return re.sub(r"_lam[0-9.e+-]+$|_k\d+$", "", name).rsplit("_w", 1)[0]


def pick(results: dict, target: float) -> list[dict]:
    """Per family, the member whose L0 is closest to ``target`` (in log ratio)."""
    best: dict[str, dict] = {}
    for name, r in results.items():
        l0 = r["reconstruction"]["l0"]
        score = abs(math.log(max(l0, 1e-3) / target))
        fam = family(name)
        if fam not in best or score < best[fam]["_score"]:
            best[fam] = {"_score": score, "name": name, **_row(name, r)}
    return sorted(best.values(), key=lambda e: e["family"])


def _row(name: str, r: dict) -> dict:
    rec, feat, down = r["reconstruction"], r["features"], r["downstream"]
    return {"family": family(name), "fvu": rec["fvu"], "l0": rec["l0"], "dead_frac": feat["dead_frac"],
            "ce_recovered": down.get("ce_recovered"), "delta_ce": down.get("delta_ce")}


def table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Every architecture on stories260K `{HOOK}` (d = 64), {meta['width']} latents, at matched L0 "
        f"(target {meta['target_l0']}). Trained on {meta['train_tokens']:,} TinyStories train tokens in one "
        f"shared pass (batch {meta['batch_size']}, lr {meta['lr']:g} for all), evaluated on "
        f"{meta['eval_tokens']:,} valid tokens. Penalised architectures: the λ of the grid whose L0 is closest "
        f"to the target. Made by `python benchmarks/arch_table.py` ({meta['seconds']:.0f} s).",
        "",
        "| architecture | SAE | L0 | FVU | dead % | CE loss recovered |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    off = False
    for e in rows:
        ce = "n/a" if e["ce_recovered"] is None else f"{e['ce_recovered']:.3f}"
        mark = " †" if abs(math.log(max(e["l0"], 1e-3) / meta["target_l0"])) > math.log(1.25) else ""
        off |= bool(mark)
        lines.append(f"| {e['family']}{mark} | `{e['name']}` | {e['l0']:.1f} | {e['fvu']:.4f} | "
                     f"{100 * e['dead_frac']:.1f} | {ce} |")
    lines += ["", "Dead % counts latents that never fire on the evaluation tokens. CE loss recovered = "
              "(CE_zero − CE_spliced) / (CE_zero − CE_clean), splicing the reconstruction into the model."]
    if off:
        lines.append("† L0 more than 25% away from the target: no λ of the grid reached it.")
    if any(e["family"] == "jumprelu-gemmascope" for e in rows):
        lines.append("Gemma Scope's recipe (θ₀ = ε = 0.001, L0 pseudo-gradient reaching only θ) cannot lower L0 "
                     "within a run this short: the threshold barely moves, so every λ gives the same SAE "
                     "(docs/recipes/jumprelu.md). Its FVU is that of a dense code and is not comparable.")
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    from saeforge.io import atomic_open

    block = f"{BEGIN}\n{text}\n{END}"
    old = path.read_text() if path.exists() else "# Results\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## Architectures at matched L0\n\n" + block + "\n"
    with atomic_open(path, "w") as fh:
        fh.write(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K" / "stories260K.bin"))
    ap.add_argument("--train-data", default=str(SHARED / "data" / "tinystories" / "train.txt"))
    ap.add_argument("--eval-data", default=str(SHARED / "data" / "tinystories" / "valid.txt"))
    ap.add_argument("--train-tokens", type=_size, default=_size("500k"))
    ap.add_argument("--eval-tokens", type=_size, default=_size("30k"))
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--l0", type=int, default=16, help="target L0 (k of the TopK family)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "runs" / "arch_table"))
    ap.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    args = ap.parse_args(argv)

    from saeforge.activations.cache import HarvestConfig, harvest
    from saeforge.activations.stream import CachedStream
    from saeforge.train.sweep import run_sweep
    from saeforge.eval import evaluate_many
    from saeforge.sae import SAE
    from saeforge.train import TrainConfig

    t0 = time.perf_counter()
    out = Path(args.out)
    cache = out / "cache"
    harvest(HarvestConfig(model=args.model, data=args.train_data, hooks=[HOOK], out=str(cache), context_len=128,
                          max_tokens=args.train_tokens, device=args.device), progress=True)
    stream = CachedStream(str(cache), batch_size=args.batch_size, hooks=[HOOK], shuffle_buffer=262144, seed=0,
                          device=args.device)
    steps = math.ceil(args.train_tokens / args.batch_size)
    grid = build(args.width, args.l0, stream.d, args.model, steps)
    tc = TrainConfig(total_tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr, log_every=50,
                     checkpoint_every=0, dead_tokens=min(10_000_000, args.train_tokens // 5), device=args.device,
                     dtype="float32", seed=0)
    sweep_dir = out / "sweep"
    full_run_s = None  # a full run's wall time, kept when a rerun reuses the trained SAEs
    if (sweep_dir / "checkpoint.safetensors").exists() and (sweep_dir / "sweep.json").exists():
        print(f"reusing the trained sweep in {sweep_dir}")
        old = out / "arch_table.json"
        full_run_s = json.loads(old.read_text())["meta"].get("seconds") if old.exists() else None
    else:
        run_sweep(grid, stream, tc, sweep_dir, resume=(sweep_dir / "checkpoint.safetensors").exists())
    saes = {name: SAE.load(sweep_dir / name) for name in grid}
    res = evaluate_many(saes, model=args.model, data=args.eval_data, n_tokens=args.eval_tokens,
                        context_len=128, batch_contexts=8, device=args.device, progress=True)["saes"]
    rows = pick(res, args.l0)
    meta = {"width": args.width, "target_l0": args.l0, "train_tokens": args.train_tokens,
            "eval_tokens": args.eval_tokens, "batch_size": args.batch_size, "lr": args.lr,
            "seconds": full_run_s if full_run_s is not None else time.perf_counter() - t0}
    all_rows = sorted((dict(_row(n, r), name=n) for n, r in res.items()), key=lambda e: e["name"])
    from saeforge.io import write_json_atomic

    write_json_atomic(out / "arch_table.json", {"meta": meta, "picked": rows, "all": all_rows})
    text = table(rows, meta)
    print(text)
    write_results(Path(args.results), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
