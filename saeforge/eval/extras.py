"""The optional sections of ``saeforge eval --all``: an explicit registry, :data:`EXTRAS`.

Each section is an :class:`Extra`: ``options(cfg)`` gives its section-specific settings (recorded with its
result, so a resumed run redoes only a section whose options changed) and ``run(ctx)`` computes it from one
typed :class:`ExtraContext`. Adding a section is one entry here.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from saeforge.errors import SaeforgeError
from saeforge.eval import shared
from saeforge.eval.ablation import run_ablation_sparsity
from saeforge.eval.n2g import run_n2g
from saeforge.eval.probes import run_probe_suite
from saeforge.eval.runner import EvalConfig, EvalRunner, jsonable
from saeforge.eval.scaling import fit_scaling_law, plot_scaling
from saeforge.models import LoadedModel
from saeforge.sae.base import SAE


@dataclass
class ExtraContext:
    """Everything an optional section reads: one SAE, the model, the data and the eval settings."""

    sae: SAE
    model: LoadedModel
    data: str | Iterable[str]
    cfg: EvalConfig
    options: dict[str, Any]  # this section's own settings (Extra.options(cfg))
    device: torch.device
    out: Path | None  # this section's folder for its files, or None
    progress: bool


@dataclass(frozen=True)
class Extra:
    options: Callable[[EvalConfig], dict[str, Any]]
    run: Callable[[ExtraContext], dict[str, Any]]


def _probe_options(cfg: EvalConfig) -> dict[str, Any]:
    tasks = cfg.probe_tasks
    return {"n_tokens": cfg.probe_tokens or cfg.n_tokens, "tasks": tasks, "builtin_tasks": tasks != [],
            "tasks_jsonl": cfg.probe_task_file, "batch_size": cfg.batch_contexts}


def _probes(ctx: ExtraContext) -> dict[str, Any]:
    c = ctx.cfg
    return run_probe_suite(ctx.sae, ctx.model, ctx.data, **ctx.options, context_len=c.context_len,
                           text_field=c.text_field, split=c.split, seed=c.seed, progress=ctx.progress)


def _n2g_options(cfg: EvalConfig) -> dict[str, Any]:
    held = cfg.n2g_contexts // 3
    # contexts go --batch-size at a time (memory); the short re-run sequences 64+ at a time (speed)
    return {"n_latents": cfg.n2g_latents, "n_train_contexts": cfg.n2g_contexts - held,
            "n_heldout_contexts": held, "batch_size": cfg.batch_contexts}


def _n2g(ctx: ExtraContext) -> dict[str, Any]:
    c = ctx.cfg
    return run_n2g(ctx.sae, ctx.model, ctx.data, **ctx.options, context_len=c.context_len, text_field=c.text_field,
                   split=c.split, seed=c.seed, progress=ctx.progress)


def _ablation(ctx: ExtraContext) -> dict[str, Any]:
    c = ctx.cfg
    return run_ablation_sparsity(ctx.sae, ctx.model, ctx.data, **ctx.options, context_len=c.context_len,
                                 text_field=c.text_field, split=c.split, seed=c.seed, progress=ctx.progress)


EXTRAS: dict[str, Extra] = {
    "probes": Extra(_probe_options, _probes),
    "n2g": Extra(_n2g_options, _n2g),
    "ablation": Extra(lambda cfg: {"n_positions": cfg.ablation_positions}, _ablation),
}


def run_extras(runner: EvalRunner, progress: bool = True, device: Any = None) -> dict[str, dict[str, Any]]:
    """Run the optional sections (``cfg.extras``, default all) on every SAE; each result records its wall time
    (``seconds``) and the options it ran with (``options``). Results are cached in the state: a resumed run
    skips those whose options are unchanged.

    A failing extra is recorded as ``{"error": ...}`` and reported, so one broken optional section never
    loses a finished evaluation. Model activations that do not depend on the SAE (the probe texts' hook
    activations, N2G's contexts) are computed once per hook and shared by every SAE (``saeforge.eval.shared``).
    """
    state = runner.state
    done = state.setdefault("extras", {})
    c = runner.cfg
    wanted = c.extras if c.extras is not None else list(EXTRAS)
    with shared.activation_memo():
        for key, extra in EXTRAS.items():
            if key not in wanted:
                continue
            section = extra.options(c)
            for name, sae in runner.saes.items():
                prev = done.get(name, {}).get(key)
                if isinstance(prev, dict) and prev.get("options", section) == jsonable(section) and \
                        "error" not in prev:
                    continue
                ctx = ExtraContext(sae, runner.lm, runner.data, c, section, device or runner.lm.device,
                                   runner.sae_dir(name) / key if runner.out else None, progress)
                t0 = time.perf_counter()
                try:
                    res = jsonable(extra.run(ctx))
                except (KeyboardInterrupt, MemoryError):
                    raise
                except SaeforgeError as e:  # bad input to a section (e.g. a broken task file): one line
                    print(f"saeforge eval: warning: {key} skipped on {name}: {e}", file=sys.stderr)
                    res = {"error": str(e)}
                except Exception as e:  # noqa: BLE001 - an optional section must not sink the evaluation
                    print(f"saeforge eval: warning: {key} failed on {name}: {type(e).__name__}: {e}",
                          file=sys.stderr)
                    res = {"error": f"{type(e).__name__}: {e}"}
                if not isinstance(res, dict):
                    res = {"value": res}
                res["seconds"] = round(time.perf_counter() - t0, 3)
                res["options"] = jsonable(section)
                done.setdefault(name, {})[key] = res
                runner.save_state(state)
    return {n: {k: v for k, v in by.items() if k in wanted} for n, by in done.items()}


def run_scaling(points: list[dict[str, Any]], fig_path: Path | None) -> dict[str, Any] | None:
    """Scaling-law fit over several SAEs (:mod:`saeforge.eval.scaling`; needs scipy), with its plot."""
    if len(points) < 2:
        return None
    try:
        fit = jsonable(fit_scaling_law(points))
        if fig_path is not None:
            plot_scaling(fit, points, fig_path)
            if fig_path.exists():
                fit = {**fit, "figures": [str(fig_path)]} if isinstance(fit, dict) else fit
        return fit
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
