"""Sweeps: a grid of SAEs (architectures × widths × k or λ) trained from ONE pass over the data.

The activations are read (or computed) and shuffled once; every SAE of the grid takes each batch in turn
(the :class:`~saeforge.train.trainer.Trainer` holds a dict of SAEs). Each SAE lands in ``OUT/<name>``
(``topk_w1024_k16``, ``relu_w512_lam5``, ``jumprelu-gemmascope_w512_lam0.5``) and ``OUT/sweep.json`` indexes
them with their final metrics. ``saeforge sweep`` is the command line over :func:`build_grid` and
:func:`run_sweep`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from saeforge import distributed as dist
from saeforge.config import parse_size
from saeforge.errors import SaeforgeError
from saeforge.io import write_json_atomic
from saeforge.sae import get_arch, make_config
from saeforge.sae.base import SAEConfig
from saeforge.tracking import TrackingConfig
from saeforge.train.config import TrainConfig
from saeforge.train.trainer import Trainer


def parse_list(text: str | None, kind: type | str = str) -> list[Any]:
    """``"a,b"`` -> ``["a", "b"]`` read as ``kind``: ``str``, ``int`` or ``float`` (positive and finite), or
    ``"count"`` (latent counts, read as every count flag is: 512, 16k, 1M)."""
    if not text:
        return []
    if kind == "count":
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
) -> dict[str, SAEConfig]:
    """name -> SAE config for every combination. ``d`` maps hook -> width; crosscoders use ``hooks``."""
    sets, used = dict(sets or {}), set()
    recipe_used = recipe is None
    grid: dict[str, SAEConfig] = {}
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


def run_sweep(grid: dict[str, SAEConfig], stream: Any, train_cfg: TrainConfig, out: str | Path,
              resume: bool = False, progress: bool = True, allow_changes: tuple[str, ...] = (),
              tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """Train every SAE of ``grid`` from one pass over ``stream``; write and return the sweep.json index."""
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
            "name": name, "arch": cfg.arch, "recipe": cfg.to_dict().get("recipe"), "d_sae": cfg.d_sae,
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
