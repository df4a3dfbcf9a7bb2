"""``saeforge.eval``: how good is an SAE? Reconstruction, downstream loss, latent statistics, report.

Python API (mirrors ``saeforge eval``)::

    from saeforge.eval import evaluate, format_table
    result = evaluate("runs/topk", model="stories260K.bin", data="valid.txt", n_tokens=200_000, out="runs/topk/eval")
    print(format_table(result))

``evaluate`` takes one SAE (an :class:`~saeforge.sae.SAE` or anything :func:`saeforge.formats.load_sae` reads),
``evaluate_many`` several (one shared model pass), including sweep folders. The modules: ``runner`` (the core
passes), ``sources`` (which SAEs and model), ``extras`` (the registry of ``--all``'s optional sections,
:data:`EXTRAS`), ``api`` (evaluate). Metric definitions: docs/eval.md.
"""
from __future__ import annotations

from saeforge.eval.api import evaluate, evaluate_many
from saeforge.eval.downstream import DownstreamStats, downstream_batch
from saeforge.eval.extras import EXTRAS, Extra, ExtraContext, run_extras, run_scaling
from saeforge.eval.features import FeatureStats, decoder_max_cos, feature_summary, latent_quantiles
from saeforge.eval.recon import ReconStats, encode_decode, reconstruction_metrics
from saeforge.eval.report import Section, build_report, format_table, frontier_points, sections_from_result, text_table
from saeforge.eval.runner import EvalConfig, EvalRunner, jsonable
from saeforge.eval.sources import expand_sources, set_hook

__all__ = [
    "EvalConfig", "EvalRunner", "evaluate", "evaluate_many", "expand_sources", "set_hook", "format_table",
    "text_table", "build_report", "Section", "sections_from_result", "ReconStats", "FeatureStats",
    "DownstreamStats", "reconstruction_metrics", "encode_decode", "feature_summary", "latent_quantiles",
    "decoder_max_cos", "downstream_batch", "frontier_points", "jsonable", "EXTRAS", "Extra", "ExtraContext",
    "run_extras", "run_scaling",
]
