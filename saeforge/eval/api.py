"""``evaluate`` / ``evaluate_many``: the core passes (:class:`~saeforge.eval.runner.EvalRunner`), the optional
sections of ``--all`` (:mod:`saeforge.eval.extras`), the files and the report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from saeforge import distributed as dist
from saeforge.errors import NonFiniteError, SaeforgeError
from saeforge.eval.extras import run_extras, run_scaling
from saeforge.eval.probe_tasks import read_jsonl_tasks
from saeforge.eval.report import build_report, frontier_points
from saeforge.eval.runner import EvalConfig, EvalRunner, jsonable
from saeforge.eval.sources import eval_model, named_saes, set_hook
from saeforge.io import write_json_atomic
from saeforge.lock import folder_lock
from saeforge.paths import require_exists, warn_model_mismatch
from saeforge.sae.base import SAE


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
    if isinstance(data, (str, Path)):
        require_exists(data, "data", "--data")
    if run_all and cfg.probe_task_file is not None and (cfg.extras is None or "probes" in cfg.extras):
        read_jsonl_tasks(cfg.probe_task_file)  # a missing or malformed task file fails now, not after the passes
    named, sources = named_saes(saes, "cpu")
    if hook:
        for name, sae in named.items():
            if sae.cfg.target_hook and sae.cfg.target_hook != sae.cfg.hook:
                raise SaeforgeError(f"--hook overrides the hook of plain SAEs; {name!r} is a transcoder "
                                    f"({sae.cfg.hook} -> {sae.cfg.target_hook}): evaluate it without --hook")
            set_hook(sae, str(hook))
    dist.init(device)  # under torchrun: before the model lands on this rank's GPU
    lm = eval_model(model, named, tokenizer, device, dtype, cfg.device_map)
    if model is not None:
        warn_model_mismatch({n: s.cfg.model for n, s in named.items()}, lm.spec, "eval",
                            "--model/--hook")
    runner = EvalRunner(named, lm, data, cfg, out)
    if out is None:
        return _evaluate(runner, sources, None, resume, progress, run_all, report, on_chunk)
    with folder_lock(out, "eval"):
        return _evaluate(runner, sources, Path(out), resume, progress, run_all, report, on_chunk)


def _evaluate(runner: EvalRunner, sources: dict[str, str], out_p: Path | None, resume: bool, progress: bool,
              run_all: bool, report: bool, on_chunk: Callable | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = runner.run(resume=resume, progress=progress, on_chunk=on_chunk)
    seconds: dict[str, float] = {"core": round(time.perf_counter() - t0, 3)}  # recon + downstream, all SAEs
    for name, src in sources.items():
        results[name]["sae"]["source"] = src
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


