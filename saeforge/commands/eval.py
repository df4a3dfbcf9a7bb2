"""``saeforge eval``: reconstruction, spliced-in loss and latent statistics of one or more SAEs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saeforge import distributed as dist
from saeforge.config import config_flag, config_flags, config_values, parse_size
from saeforge.errors import SaeforgeError
from saeforge.eval import evaluate_many, format_table
from saeforge.eval.runner import EvalConfig

COUNT = {"type": parse_size}  # counts read as every count flag is (200k, 1M)
CONFIG_FIELDS = ("text_field", "split", "n_tokens", "context_len", "batch_contexts", "chunk_batches",
                 "dense_threshold", "sample_tokens", "splice_all", "seed", "extras", "n2g_latents", "n2g_contexts",
                 "probe_tasks", "probe_task_file", "probe_tokens", "ablation_positions", "device_map")


def _names(text: str) -> list[str]:
    """'a,b , c' -> ['a', 'b', 'c']; 'none' -> []."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    return [] if names == ["none"] else names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate SAEs: FVU, L0, dead/dense latents, spliced-in CE loss and KL",
        description="Evaluate SAEs on held-out text: reconstruction (FVU, MSE, cosine, L0), latent statistics "
                    "(dead, dense, activation quantiles, decoder similarity) and, for causal LMs, the model's "
                    "loss with the SAE spliced in against zero/mean ablation. Prints a table and writes "
                    "OUT/eval.json; --report/--all add OUT/report.md with plots. Metrics: docs/eval.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sae", action="append", required=True, metavar="PATH",
                   help="SAE folder or checkpoint in any supported format, or a sweep folder with sweep.json "
                        "(repeat for several: they share the model passes and get a frontier plot)")
    p.add_argument("--model", help="model spec (default: the model named in the SAE's cfg; a different one runs "
                                   "with a one-line warning)")
    p.add_argument("--hook", help="hook point to read every SAE at, e.g. resid_post.2 or blocks.2.hook_resid_post "
                                  "(default: each SAE's own cfg.hook; with --model, to run an SAE on another model "
                                  "on purpose)")
    p.add_argument("--tokenizer", help="tokenizer for llama2.c models (default: tok*.bin beside the model)")
    p.add_argument("--data", required=True, help="held-out text: .txt/.jsonl/.parquet, a folder or a data set")
    config_flags(p, EvalConfig, {
        "text_field": "text field of .jsonl/.parquet/data sets",
        "split": "data-set split when --data is a data set",
        "n_tokens": "eval tokens (non-special), e.g. 200k",
        "context_len": "tokens per context",
        "batch_contexts": "contexts per forward pass",
        "chunk_batches": "batches between resume checkpoints",
        "dense_threshold": "a latent firing on more than this fraction of tokens counts as dense",
        "sample_tokens": "tokens sampled for per-latent activation quantiles",
    }, n_tokens=COUNT, sample_tokens=COUNT)
    p.add_argument("--no-downstream", action="store_true", help="skip the spliced-loss pass")
    config_flag(p, EvalConfig, "splice_all",
                "also splice and score BOS/special positions (default: keep their activations)")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--report", action="store_true", help="write OUT/report.md with PNG plots")
    p.add_argument("--all", action="store_true", dest="run_all",
                   help="everything: also probe loss, N2G, ablation sparsity, scaling fit (when installed) + report")
    g = p.add_argument_group("optional sections (--all; docs/eval.md)")
    config_flags(g, EvalConfig, {
        "extras": "which optional sections --all runs: a comma-separated subset of probes,n2g,ablation "
                  "(default: all installed)",
        "n2g_latents": "latents N2G explains per SAE",
        "n2g_contexts": "contexts N2G reads: 2/3 build the patterns, 1/3 score them",
        "probe_tasks": "built-in probe tasks to run, comma-separated (`none` for only --probe-task-file); "
                       "default: all (names: docs/eval.md)",
        "probe_task_file": "user probe tasks: one JSON object per line, "
                           "{\"task\", \"text\", \"spans\": [[start, end], ...]}",
        "probe_tokens": "text tokens for the built-in probe tasks (default: --tokens)",
        "ablation_positions": "positions sampled for ablation sparsity",
    }, extras={"type": _names, "metavar": "A,B"}, probe_tasks={"type": _names, "metavar": "A,B"},
        probe_task_file={"metavar": "FILE.jsonl"}, n2g_latents=COUNT, n2g_contexts=COUNT, probe_tokens=COUNT,
        ablation_positions=COUNT)
    p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", "--model-dtype", dest="dtype", default="float32",
                   help="model weights dtype: float32, bfloat16, float16")
    config_flag(p, EvalConfig, "device_map", "HF models: spread the layers over the node's GPUs through "
                "accelerate, e.g. auto (replaces --device)")
    config_flag(p, EvalConfig, "seed", "seed of the quantile token sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.context_len < 2:
        raise SaeforgeError("--batch-size must be >= 1 and --context-len >= 2")
    knobs = [f for f, v in (("--extras", args.extras), ("--probe-tasks", args.probe_tasks),
                            ("--probe-task-file", args.probe_task_file), ("--probe-tokens", args.probe_tokens))
             if v is not None]
    if knobs and not args.run_all:
        print(f"saeforge eval: note: {', '.join(knobs)} only matter with --all", file=sys.stderr)
    cfg = EvalConfig(**config_values(EvalConfig, args, CONFIG_FIELDS), downstream=not args.no_downstream)
    combined = evaluate_many(
        args.sae, model=args.model, data=args.data, out=args.out, resume=args.resume, progress=not args.no_progress,
        run_all=args.run_all, report=args.report, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        hook=args.hook, config=cfg,
    )
    if not dist.is_main():  # under torchrun: rank 0 reports
        return 0
    print(format_table(combined["saes"]))
    for name, r in combined["saes"].items():
        skipped = r.get("downstream", {}).get("skipped")
        if skipped:
            print(f"{name}: downstream loss skipped: {skipped}")
    out = Path(args.out)
    written = [out / "eval.json"] + ([out / "report.md"] if (args.report or args.run_all) else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
