"""``saeforge dashboard build`` / ``saeforge dashboard serve``: browse what each latent of an SAE does."""
from __future__ import annotations

import argparse
import dataclasses

from saeforge.config import config_flags, config_values, parse_size
from saeforge.dashboard.build import DashboardConfig, build_dashboard
from saeforge.dashboard.serve import serve
from saeforge.errors import SaeforgeError

# every DashboardConfig field but the three positional/required ones has its flag
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DashboardConfig) if f.name not in ("sae", "data", "out"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="build or serve a feature dashboard (a static site, a page per latent)",
                       description="Feature dashboards: `build` streams the data once through the SAE and writes a "
                                   "static site; `serve` shows it on localhost.")
    dsub = p.add_subparsers(dest="dashboard_command", metavar="{build,serve}")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    b = dsub.add_parser("build", help="compute every latent's examples and statistics; write the site",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="One resumable streaming pass over the data: per latent the top-activating "
                                    "contexts, quantile-band samples, activation histogram, density; then logit "
                                    "effects, nearest latents and (optionally) N2G explanations. Rerun the same "
                                    "command to resume an interrupted build.")
    b.add_argument("sae", help="SAE folder or file in any format saeforge reads (saeforge, SAELens, sparsify, ...)")
    b.add_argument("--data", required=True,
                   help="activation cache folder (saeforge harvest) or text (.txt/.jsonl/.parquet/HF dataset) "
                        "to run through the model")
    b.add_argument("--out", required=True, help="output folder for the site")
    config_flags(b, DashboardConfig, {
        "model": "model (default: the SAE's cfg.model or the cache's model; one the SAE does not name runs with a "
                 "warning)",
        "tokenizer": "tokenizer (llama2.c .bin) if not beside the model",
        "hook": "input hook (default: the SAE's; override to read another hook point)",
        "sae_format": "SAE format (default: detected)",
        "explanations": "eval.json / n2g JSON with {\"explanations\": {id: {pattern, precision, recall, f1}}}",
        "top_k": "top-activating examples per latent",
        "context": "tokens of context on each side of an example",
        "n_bands": "activation-quantile bands",
        "per_band": "examples per quantile band",
        "reservoir": "band sample size per latent (default 2 x bands x per-band)",
        "hist_bins": "bins of the displayed histograms",
        "n_logits": "top/bottom logit-effect tokens per latent",
        "n_neighbors": "nearest latents by decoder cosine",
        "max_tokens": "stop after this many tokens (e.g. 500k)",
        "context_len": "tokens per context when running text",
        "batch_contexts": "contexts per forward pass when running text (default: ~2M residual floats per pass, "
                          "8..256)",
        "text_field": "text field of .jsonl/.parquet/HF data",
        "split": "split of a HF dataset",
        "shard_size": "latents per data shard file",
        "checkpoint_rows": "rows between checkpoints",
        "seed": "seed of the quantile-band sampling",
        "device": "cpu, cuda, cuda:1, mps or auto",
    }, max_tokens={"type": parse_size}, checkpoint_rows={"type": parse_size})
    b.add_argument("--overwrite", action="store_true", help="discard a previous build's state instead of resuming")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    s = dsub.add_parser("serve", help="serve a built dashboard on localhost",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("dir", help="folder written by `saeforge dashboard build`")
    s.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (keep 127.0.0.1 unless you mean to share it)")
    s.set_defaults(func=run_serve)


def run_build(args: argparse.Namespace) -> int:
    cfg = DashboardConfig(sae=args.sae, data=args.data, out=args.out,
                          **config_values(DashboardConfig, args, CONFIG_FIELDS))
    out = build_dashboard(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"dashboard written to {out}; view it with `saeforge dashboard serve {out}` or open {out}/index.html")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    if args.port < 0 or args.port > 65535:
        raise SaeforgeError(f"--port {args.port} is not a port; use 0..65535 (0 = any free port)")
    serve(args.dir, port=args.port, host=args.host, announce=lambda msg: print(msg, flush=True))
    return 0
