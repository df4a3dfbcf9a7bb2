"""``saeforge.eval``: how good is an SAE? Reconstruction, downstream loss, latent statistics, report.

Python API (mirrors ``saeforge eval``)::

    from saeforge.eval import evaluate, format_table
    result = evaluate("runs/topk", model="stories260K.bin", data="valid.txt", n_tokens=200_000, out="runs/topk/eval")
    print(format_table(result))

``evaluate`` takes one SAE (an :class:`~saeforge.sae.SAE` or anything :func:`saeforge.formats.load_sae` reads),
``evaluate_many`` several (one shared model pass), including sweep folders. Metric definitions: docs/eval.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from saeforge.errors import NonFiniteError, SaeforgeError
from saeforge.eval.downstream import DownstreamStats, downstream_batch
from saeforge.eval.features import FeatureStats, decoder_max_cos, feature_summary, latent_quantiles
from saeforge.eval.recon import ReconStats, encode_decode, reconstruction_metrics
from saeforge.eval.report import Section, build_report, format_table, frontier_points, sections_from_result, text_table
from saeforge.eval.runner import EvalConfig, EvalRunner, jsonable
from saeforge.formats import load_sae
from saeforge.io import write_json_atomic
from saeforge.sae.base import SAE

__all__ = [
    "EvalConfig", "EvalRunner", "evaluate", "evaluate_many", "expand_sources", "format_table",
    "text_table", "build_report", "Section", "sections_from_result", "ReconStats", "FeatureStats",
    "DownstreamStats", "reconstruction_metrics", "encode_decode", "feature_summary", "latent_quantiles",
    "decoder_max_cos", "downstream_batch", "frontier_points", "jsonable",
]


# ---- naming SAEs (loading them: saeforge.formats.load_sae, the one loader) -------------------------------
def _sweep_members(folder: Path) -> list[tuple[str, str]]:
    """SAEs listed by ``folder/sweep.json`` (``{"runs": [...]}``, ``{"saes": ...}`` or a list; each entry a path
    or a dict with ``out``/``path``/``dir`` and optional ``name``); else sub-folders holding ``cfg.json``."""
    try:
        data = json.loads((folder / "sweep.json").read_text())
    except json.JSONDecodeError as e:
        raise SaeforgeError(f"{folder / 'sweep.json'} is not valid JSON ({e.msg}); fix or remove it") from None
    runs = data if isinstance(data, list) else next((data[k] for k in ("runs", "saes", "members") if k in data), [])
    items = list(runs.items()) if isinstance(runs, dict) else [(None, r) for r in runs]
    members = []
    for name, entry in items:
        path = entry if isinstance(entry, str) else next(
            (entry[k] for k in ("out", "path", "dir") if isinstance(entry, dict) and k in entry), None)
        if path is None:
            continue
        p = Path(path)
        if not p.is_absolute() and (folder / p).exists():
            p = folder / p
        name = name or (entry.get("name") if isinstance(entry, dict) else None) or p.name
        members.append((str(name), str(p)))
    if not members:
        members = [(p.name, str(p)) for p in sorted(folder.iterdir()) if p.is_dir() and (p / "cfg.json").exists()]
    if not members:
        raise SaeforgeError(f"{folder}/sweep.json lists no SAE folders; point --sae at the trained SAE folders")
    return members


def expand_sources(sources: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(name, path)`` per SAE; a folder with ``sweep.json`` expands to its members. Names are made unique."""
    pairs: list[tuple[str, str]] = []
    for s in sources:
        p = Path(s)
        if p.is_dir() and (p / "sweep.json").exists():
            pairs += _sweep_members(p)
        else:
            pairs.append((p.name or str(s), str(s)))
    return _unique(pairs)


def _unique(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: dict[str, int] = {}
    out = []
    for name, v in pairs:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", v))
    return out


def _named_saes(saes: Any, device: Any) -> tuple[dict[str, SAE], dict[str, str]]:
    if isinstance(saes, (SAE, str, Path)):
        saes = [saes]
    if isinstance(saes, Mapping):
        items: list[tuple[str, Any]] = list(saes.items())
    else:
        saes = list(saes)
        items = []
        for i, s in enumerate(saes):
            items += [(f"sae{i}" if len(saes) > 1 else "sae", s)] if isinstance(s, SAE) else expand_sources([s])
        items = _unique(items)
    loaded, sources = {}, {}
    for name, s in items:
        if isinstance(s, SAE):
            loaded[name] = s
        else:
            loaded[name] = load_sae(s, device=device)
            sources[name] = str(s)
    return loaded, sources


def _model(model: Any, saes: Mapping[str, SAE], tokenizer: str | None, device: Any, dtype: Any) -> Any:
    if model is not None and not isinstance(model, (str, Path)):
        return model
    from saeforge.device import DTYPES, resolve_device
    from saeforge.models import load_model

    if model is None:
        specs = {s.cfg.model for s in saes.values()}
        if None in specs or "" in specs:
            unnamed = sorted(n for n, s in saes.items() if not s.cfg.model)
            raise SaeforgeError(f"SAE(s) {unnamed} do not record the model they were trained on; pass --model")
        if len(specs) != 1:
            raise SaeforgeError(f"the SAEs name different models {sorted(map(str, specs))}; evaluate them "
                                "separately or pass --model")
        model = specs.pop()
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise SaeforgeError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return load_model(str(model), tokenizer=tokenizer, device=resolve_device(device or "auto"),
                      **({"dtype": dt} if dt is not None else {}))


# ---- the API ----------------------------------------------------------------------------------------------
def set_hook(sae: SAE, hook: str) -> None:
    """Point ``sae`` at another input hook (``--hook``); a transcoder's target hook is left as it is."""
    if getattr(sae.cfg, "hooks", None):
        raise SaeforgeError(f"--hook {hook!r}: a crosscoder reads several hooks ({sae.cfg.hooks}); it cannot be moved")
    if sae.cfg.target_hook in (None, "", sae.cfg.hook):
        sae.cfg.target_hook = None if not sae.cfg.target_hook else hook
    sae.cfg.hook = hook.strip()


def evaluate_many(
    saes: Any,
    model: Any = None,
    data: str | None = None,
    n_tokens: int = 100_000,
    context_len: int = 128,
    batch_contexts: int = 8,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    run_all: bool = False,
    report: bool = False,
    tokenizer: str | None = None,
    device: Any = None,
    dtype: Any = None,
    hook: str | None = None,
    config: EvalConfig | None = None,
    on_chunk: Callable[[str, int], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate several SAEs on one model; returns ``{"saes": {name: result}, "frontier": [...], ...}``.

    ``saes``: SAE objects, paths (any format; sweep folders expand), or ``{name: SAE | path}``. ``model``: a
    :class:`~saeforge.models.LoadedModel`, a spec, or None for the SAEs' ``cfg.model``. Other keyword options
    are :class:`EvalConfig` fields (``dense_threshold``, ``downstream``, ``splice_all``, ``sample_tokens`` ...).
    ``run_all`` adds the optional modules (probes, N2G, ablation, scaling) and the report; ``report`` the report.
    ``hook`` reads every SAE at that hook point instead of its ``cfg.hook`` (an alias, a module path or a
    TransformerLens name; plain SAEs, not transcoders).
    """
    if not data:
        raise SaeforgeError("no eval data: pass --data with a held-out text file or data set")
    cfg = config or EvalConfig.from_dict({"n_tokens": int(n_tokens), "context_len": int(context_len),
                                          "batch_contexts": int(batch_contexts), **options})
    from saeforge.paths import require_exists, warn_model_mismatch

    if isinstance(data, (str, Path)):
        require_exists(data, "data", "--data")
    if run_all and cfg.probe_task_file is not None and (cfg.extras is None or "probes" in cfg.extras):
        from saeforge.eval.probe_tasks import read_jsonl_tasks

        read_jsonl_tasks(cfg.probe_task_file)  # a missing or malformed task file fails now, not after the passes
    named, sources = _named_saes(saes, "cpu")
    if hook:
        for name, sae in named.items():
            if sae.cfg.target_hook and sae.cfg.target_hook != sae.cfg.hook:
                raise SaeforgeError(f"--hook overrides the hook of plain SAEs; {name!r} is a transcoder "
                                    f"({sae.cfg.hook} -> {sae.cfg.target_hook}): evaluate it without --hook")
            set_hook(sae, str(hook))
    from saeforge import distributed as dist

    dist.init(device)  # under torchrun: before the model lands on this rank's GPU
    lm = _model(model, named, tokenizer, device, dtype)
    if model is not None:
        warn_model_mismatch({n: s.cfg.model for n, s in named.items()}, getattr(lm, "spec", None), "eval",
                            "--model/--hook")
    runner = EvalRunner(named, lm, data, cfg, out)
    if out is None:
        return _evaluate(runner, sources, None, resume, progress, run_all, report, on_chunk)
    from saeforge.lock import folder_lock

    with folder_lock(out, "eval"):
        return _evaluate(runner, sources, Path(out), resume, progress, run_all, report, on_chunk)


def _evaluate(runner: EvalRunner, sources: dict[str, str], out_p: Path | None, resume: bool, progress: bool,
              run_all: bool, report: bool, on_chunk: Callable | None) -> dict[str, Any]:
    import time

    t0 = time.perf_counter()
    results = runner.run(resume=resume, progress=progress, on_chunk=on_chunk)
    seconds: dict[str, float] = {"core": round(time.perf_counter() - t0, 3)}  # recon + downstream, all SAEs
    for name, src in sources.items():
        results[name]["sae"]["source"] = src
    from saeforge import distributed as dist

    if not dist.is_main():  # under torchrun the passes are split; rank 0 alone runs the extras and writes
        return {"saes": results, "frontier": frontier_points(results)}
    extras = run_extras(runner, progress=progress) if run_all else {}
    for name, by_key in extras.items():
        results[name]["extras"] = by_key
        for key, res in by_key.items():
            if isinstance(res, dict) and isinstance(res.get("seconds"), (int, float)):
                seconds[key] = round(seconds.get(key, 0.0) + res["seconds"], 3)
    combined: dict[str, Any] = {"saes": results, "frontier": frontier_points(results), "seconds": seconds}
    if run_all:
        fig = out_p / "figures" / "scaling.png" if out_p is not None else None
        combined["scaling"] = run_scaling(combined["frontier"], fig)
    if out_p is not None:
        runner.save_state(runner.state)
        for name, r in results.items():
            write_json_atomic(runner.sae_dir(name) / "eval.json", r)
        if len(results) > 1:
            write_json_atomic(out_p / "eval.json", jsonable(combined))
        if run_all or report:
            build_report(out_p, results, runner.arrays, runner.per_token, extras,
                         {"scaling": combined.get("scaling")}, seconds=seconds)
    bad = {name: r["nonfinite"] for name, r in results.items() if r.get("nonfinite")}
    if bad:
        name, keys = next(iter(bad.items()))
        written = f" (written as null to {out_p})" if out_p is not None else ""
        raise NonFiniteError(f"eval of {name!r}: metrics {', '.join(keys)} are NaN/Inf{written}; the model or the "
                             "data gives non-finite activations: check them (`saeforge harvest` names such rows)")
    return combined


def evaluate(
    sae: SAE | str | Path,
    model: Any = None,
    data: str | None = None,
    n_tokens: int = 100_000,
    context_len: int = 128,
    batch_contexts: int = 8,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate one SAE; returns its result dict (also written to ``out/eval.json`` when ``out`` is given).

    Keys: ``reconstruction`` (fvu, mse, cos_sim, rel_norm, rel_bias, l0, ...), ``features`` (dead, dense,
    density and activation summaries, decoder cosine stats), ``downstream`` (ce_clean, ce_spliced, ce_zero,
    ce_mean, delta_ce, kl, ce_recovered, ce_recovered_mean, kl_recovered; or ``skipped``), plus ``sae``,
    ``model``, ``data``, ``config``. Keyword arguments as for :func:`evaluate_many`.
    """
    if isinstance(sae, Mapping) or (isinstance(sae, Sequence) and not isinstance(sae, str)):
        raise SaeforgeError("evaluate takes one SAE; use evaluate_many for several")
    combined = evaluate_many([sae], model, data, n_tokens, context_len, batch_contexts, **kwargs)
    return next(iter(combined["saes"].values()))


# ---- optional sections from other evaluation modules (``--all``) ----------------------------------------------
# name -> (module, function). Each function takes (sae, model, data, **options) and returns a JSON-able dict.
EXTRAS = {
    "probes": ("saeforge.eval.probes", "run_probe_suite"),
    "n2g": ("saeforge.eval.n2g", "run_n2g"),
    "ablation": ("saeforge.eval.ablation", "run_ablation_sparsity"),
}


def _module(name: str) -> Any | None:
    """The module if it exists in this install, else None (errors inside an existing module propagate)."""
    import importlib
    import importlib.util

    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


def call_flexible(fn: Callable, args: tuple, options: Mapping[str, Any]) -> Any:
    """Call ``fn(*args, **subset)`` passing only the options its signature names (all of them with **kw)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **options)
    return fn(*args, **{k: v for k, v in options.items() if k in params})


def extra_options(cfg: EvalConfig, key: str) -> dict[str, Any]:
    """The section-specific options ``--all`` passes to optional section ``key`` (from the EvalConfig knobs)."""
    if key == "probes":
        tasks = cfg.probe_tasks
        return {"n_tokens": cfg.probe_tokens or cfg.n_tokens, "tasks": tasks, "builtin_tasks": tasks != [],
                "tasks_jsonl": cfg.probe_task_file, "batch_size": cfg.batch_contexts}
    if key == "n2g":
        held = cfg.n2g_contexts // 3
        # contexts go --batch-size at a time (memory); the short re-run sequences 64+ at a time (speed)
        return {"n_latents": cfg.n2g_latents, "n_train_contexts": cfg.n2g_contexts - held,
                "n_heldout_contexts": held, "batch_size": cfg.batch_contexts}
    if key == "ablation":
        return {"n_positions": cfg.ablation_positions}
    return {"n_tokens": cfg.n_tokens, "batch_size": cfg.batch_contexts}


def run_extras(runner: EvalRunner, progress: bool = True, device: Any = None) -> dict[str, dict[str, Any]]:
    """Run the optional sections (``cfg.extras``, default all installed) on every SAE; each result records its
    wall time (``seconds``) and the options it ran with (``options``). Results are cached in the state: a
    resumed run skips those whose options are unchanged.

    A failing extra is recorded as ``{"error": ...}`` and reported, so one broken optional section never
    loses a finished evaluation. Model activations that do not depend on the SAE (the probe texts' hook
    activations, N2G's contexts) are computed once per hook and shared by every SAE (``saeforge.eval.shared``).
    """
    import sys
    import time

    from saeforge.eval import shared

    state = runner.state
    done = state.setdefault("extras", {})
    c = runner.cfg
    wanted = c.extras if c.extras is not None else list(EXTRAS)
    with shared.activation_memo():
        for key, (mod_name, fn_name) in EXTRAS.items():
            if key not in wanted:
                continue
            mod = _module(mod_name)
            fn = getattr(mod, fn_name, None) if mod is not None else None
            if fn is None:
                continue
            section = extra_options(c, key)
            for name, sae in runner.saes.items():
                prev = done.get(name, {}).get(key)
                if isinstance(prev, dict) and prev.get("options", section) == jsonable(section) and \
                        "error" not in prev:
                    continue
                opts = {"n_tokens": c.n_tokens, "context_len": c.context_len, "seed": c.seed,
                        "text_field": c.text_field, "split": c.split, "progress": progress,
                        "device": device or runner.lm.device,
                        "out": runner.sae_dir(name) / key if runner.out else None, **section}
                t0 = time.perf_counter()
                try:
                    res = jsonable(call_flexible(fn, (sae, runner.lm, runner.data), opts))
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
    """Scaling-law fit over several SAEs with ``saeforge.eval.scaling`` when that module exists."""
    mod = _module("saeforge.eval.scaling")
    if mod is None or not hasattr(mod, "fit_scaling_law") or len(points) < 2:
        return None
    try:
        fit = jsonable(mod.fit_scaling_law(points))
        plot = getattr(mod, "plot_scaling", None)
        if plot is not None and fig_path is not None:
            opts = {"fit": fit, "result": fit, "points": points, "path": fig_path, "out": fig_path,
                    "out_path": fig_path}
            call_flexible(plot, (), opts)
            if fig_path.exists():
                fit = {**fit, "figures": [str(fig_path)]} if isinstance(fit, dict) else fit
        return fit
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
