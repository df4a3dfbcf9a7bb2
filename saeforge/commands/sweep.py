"""``saeforge sweep``: train a grid of SAEs (architectures × widths × k or λ) from ONE pass over the data.

The activations are read (or computed) and shuffled once; every SAE of the grid takes each batch in turn
(the Trainer holds a dict of SAEs). Each SAE lands in ``OUT/<name>`` (``topk_w1024_k16``,
``relu_w512_lam5``, ``jumprelu-gemmascope_w512_lam0.5``) and ``OUT/sweep.json`` indexes them with their
final metrics.

Example::

    saeforge sweep --data cache/ --hook resid_post.2 --arch topk,batchtopk,relu \\
        --width 512,1024 --k 8,16,32 --lam 1,5 --tokens 20M --out runs/sweep
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from saeforge.commands.train import (
    add_stream_args, add_train_args, allowed_changes, open_training_stream, parse_sets, train_config_from_args,
)
from saeforge.tracking import add_args as tracking_args, from_args as tracking_from_args
from saeforge.errors import SaeforgeError
from saeforge.io import write_json_atomic


def _csv(text: str | None, kind: type | str = str) -> list[Any]:
    if not text:
        return []
    if kind == "count":  # latent counts, read as every count flag is (512, 16k, 1M)
        from saeforge.config import parse_size

        return [parse_size(v) for v in str(text).split(",") if v.strip()]
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SaeforgeError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None
    if kind in (int, float) and any(not math.isfinite(v) or v <= 0 for v in values):
        raise SaeforgeError(f"{text!r}: every value must be a positive finite number")
    return values


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def sparsity_field(arch: str) -> str:
    """The config field a sweep varies for ``arch``: ``k`` or its penalty coefficient."""
    from saeforge.sae import get_arch

    cls = get_arch(arch).config_class
    names = {f.name for f in dataclasses.fields(cls)}
    fld = cls.SPARSITY_FIELD
    if fld is None or fld not in names:
        raise SaeforgeError(f"architecture {arch!r} has no sparsity knob a sweep can vary")
    return fld


def build_grid(
    archs: list[str], widths: list[int], ks: list[int], lams: list[float], *, d: dict[str, int],
    hook: str | None, target: str | None = None, hooks: list[str] | None = None,
    sets: dict[str, Any] | None = None, recipe: str | None = None, model: str | None = None,
) -> dict[str, Any]:
    """name -> SAE config for every combination. ``d`` maps hook -> width; crosscoders use ``hooks``."""
    from saeforge.sae import get_arch, make_config

    sets, used = dict(sets or {}), set()
    recipe_used = recipe is None
    grid: dict[str, Any] = {}
    if not archs or not widths:
        raise SaeforgeError("a sweep needs --arch and --width (comma-separated lists)")
    for arch in archs:
        cls = get_arch(arch).config_class
        names = {f.name for f in dataclasses.fields(cls)}
        opts = {k: v for k, v in sets.items() if k in names}
        used |= set(opts)
        tag = arch
        if recipe is not None and recipe in cls.RECIPES:
            opts["recipe"], recipe_used = recipe, True
            tag = f"{arch}-{recipe}"
        fld = sparsity_field(arch)
        values = (ks if fld == "k" else lams) or [None]
        if "hooks" in names:  # a crosscoder reads several hooks
            if not hooks:
                raise SaeforgeError(f"{arch} needs the hooks it reads: pass --hooks a,b")
            base = dict(d_in=sum(d[h] for h in hooks), hooks=list(hooks))
        else:
            if hook is None:
                raise SaeforgeError(f"the data has several hooks {sorted(d)}; choose one with --hook")
            base = dict(d_in=d[hook], hook=hook, target_hook=target, d_out=d[target] if target else None)
            if target and target != hook:
                opts.setdefault("apply_b_dec_to_input", False)
        for width in widths:
            for v in values:
                kw = dict(base, d_sae=width, model=model, **opts)
                name = f"{tag}_w{width}"
                if v is not None:
                    kw[fld] = int(v) if fld == "k" else float(v)
                    name += f"_{'k' if fld == 'k' else 'lam'}{_fmt(kw[fld])}"
                grid[name] = make_config(arch, **kw)
    unused = sorted(set(sets) - used)
    if unused:
        raise SaeforgeError(f"--set key(s) {unused} belong to none of the architectures {archs}")
    if not recipe_used:
        raise SaeforgeError(f"--recipe {recipe!r} is a recipe of none of the architectures {archs}")
    return grid


def run_sweep(grid: dict[str, Any], stream: Any, train_cfg: Any, out: str | Path, resume: bool = False,
              progress: bool = True, allow_changes: tuple[str, ...] = (), tracking: Any = None) -> dict[str, Any]:
    """Train every SAE of ``grid`` from one pass over ``stream``; write and return the sweep.json index."""
    from saeforge.train import Trainer

    from saeforge import distributed as dist

    trainer = Trainer(grid, stream, train_cfg, out, tracking)
    trainer.fit(resume=resume, progress=progress, allow_changes=allow_changes)
    entries = []
    for name, run in trainer.runs.items():
        cfg = run.sae.cfg
        fld = sparsity_field(cfg.arch)
        metrics: dict[str, Any] = {}
        mfile = run.out / "metrics.jsonl"
        if mfile.exists() and mfile.read_text().strip():
            metrics = json.loads(mfile.read_text().strip().splitlines()[-1])
        entries.append({
            "name": name, "arch": cfg.arch, "recipe": getattr(cfg, "recipe", None), "d_sae": cfg.d_sae,
            "sparsity_field": fld, "sparsity_value": getattr(cfg, fld), "path": str(Path(name)),
            "final": {k: metrics.get(k) for k in ("fvu", "l0", "dead_frac", "loss") if k in metrics},
        })
    if trainer.par.spread:  # each process trained (and knows) only its own SAEs
        found = {e["name"]: e for part in dist.all_gather_object(entries) for e in part}
        entries = [found[n] for n in trainer.names]
    index = {"format": "saeforge-sweep/1", "tokens": trainer.tokens, "steps": trainer.global_step,
             "train": train_cfg.to_dict(), "saes": entries}
    if trainer.par.writer:
        write_json_atomic(Path(out) / "sweep.json", index)
    return index


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="train a grid of SAEs (arch × width × k/λ) from one pass over the data",
        description="Train many SAEs at once from one stream of activations (loaded and shuffled once). "
                    "Writes OUT/<name>/ for each SAE and OUT/sweep.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_stream_args(p)
    g = p.add_argument_group("grid")
    g.add_argument("--arch", required=True, help="comma-separated architectures, e.g. topk,batchtopk,relu")
    g.add_argument("--width", required=True, help="comma-separated latent counts, e.g. 512,1024")
    g.add_argument("--k", help="comma-separated k values (topk, batchtopk, matryoshka)")
    g.add_argument("--lam", help="comma-separated sparsity coefficients λ (relu, gated, jumprelu, crosscoder)")
    g.add_argument("--hook", help="input hook point (default: the data's only hook)")
    g.add_argument("--target", help="target hook point: train transcoders")
    g.add_argument("--hooks", help="comma-separated hook points a crosscoder reads and reconstructs")
    g.add_argument("--recipe", help="training recipe for the archs that have it (e.g. gemmascope, monosemanticity)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config field for every arch that has it, e.g. --set aux_coef=0.05 (repeatable)")
    add_train_args(p)
    tracking_args(p)
    p.add_argument("--spread", action="store_true",
                   help="under torchrun: place whole SAEs on processes (each process trains its share of the grid "
                        "on every batch; any grid size) instead of splitting every batch over the processes")
    p.add_argument("--out", default="runs/sweep", help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.data:
        raise SaeforgeError("--data is required: an activation cache folder or a text source")
    train_cfg = train_config_from_args(args)  # validated before any data is opened
    track = tracking_from_args(args)
    hooks = _csv(args.hooks)
    wanted = sorted({h for h in [args.hook, args.target, *hooks] if h}) or None
    stream = open_training_stream(args, wanted, args.batch_size, args.seed)
    hook = args.hook or (stream.hooks[0] if len(stream.hooks) == 1 else None)
    grid = build_grid(
        _csv(args.arch), _csv(args.width, "count"), _csv(args.k, int), _csv(args.lam, float), d=stream.d,
        hook=hook, target=args.target, hooks=hooks, sets=parse_sets(args.set), recipe=args.recipe,
        model=getattr(stream, "model_spec", None) or args.model,
    )
    index = run_sweep(grid, stream, train_cfg, args.out, resume=args.resume, progress=not args.no_progress,
                      allow_changes=allowed_changes(args), tracking=track)
    from saeforge import distributed as dist

    if not dist.is_main():
        return 0
    for e in index["saes"]:
        f = e["final"]
        print(f"{e['name']:40s} fvu {f.get('fvu', float('nan')):.4f}  l0 {f.get('l0', float('nan')):.1f}  "
              f"dead {f.get('dead_frac', float('nan')):.1%}")
    print(f"wrote {Path(args.out) / 'sweep.json'}")
    return 0
