"""``saeforge dashboard build`` / ``saeforge dashboard serve``: browse what each latent of an SAE does."""
from __future__ import annotations

import argparse

from saeforge.errors import SaeforgeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="build or serve a feature dashboard (a static site, a page per latent)",
                       description="Feature dashboards: `build` streams the data once through the SAE and writes a "
                                   "static site; `serve` shows it on localhost.")
    dsub = p.add_subparsers(dest="dashboard_command", metavar="{build,serve}")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    from saeforge.commands.train import parse_size

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
    b.add_argument("--model", help="model (default: the SAE's cfg.model or the cache's model; one the SAE "
                                   "does not name runs with a warning)")
    b.add_argument("--tokenizer", help="tokenizer (llama2.c .bin) if not beside the model")
    b.add_argument("--hook", help="input hook (default: the SAE's; override to read another hook point)")
    b.add_argument("--format", dest="sae_format", help="SAE format (default: detected)")
    b.add_argument("--explanations", help="eval.json / n2g JSON with {\"explanations\": {id: {pattern, precision, recall, f1}}}")
    b.add_argument("--top-k", type=int, default=20, help="top-activating examples per latent")
    b.add_argument("--context", type=int, default=10, help="tokens of context on each side of an example")
    b.add_argument("--bands", type=int, default=10, help="activation-quantile bands")
    b.add_argument("--per-band", type=int, default=5, help="examples per quantile band")
    b.add_argument("--reservoir", type=int, help="band sample size per latent (default 2 x bands x per-band)")
    b.add_argument("--hist-bins", type=int, default=40, help="bins of the displayed histograms")
    b.add_argument("--logits", type=int, default=10, help="top/bottom logit-effect tokens per latent")
    b.add_argument("--neighbors", type=int, default=10, help="nearest latents by decoder cosine")
    b.add_argument("--max-tokens", type=parse_size, help="stop after this many tokens (e.g. 500k)")
    b.add_argument("--context-len", type=int, default=128, help="tokens per context when running text")
    b.add_argument("--batch-contexts", type=int,
                   help="contexts per forward pass when running text (default: ~2M residual floats per pass, 8..256)")
    b.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF data")
    b.add_argument("--split", default="train", help="split of a HF dataset")
    b.add_argument("--shard-size", type=int, default=16, help="latents per data shard file")
    b.add_argument("--checkpoint-rows", type=parse_size, default=262144, help="rows between checkpoints")
    b.add_argument("--seed", type=int, default=0, help="seed of the quantile-band sampling")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
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
    from saeforge.dashboard.build import DashboardConfig, build_dashboard

    cfg = DashboardConfig(
        sae=args.sae, data=args.data, out=args.out, model=args.model, tokenizer=args.tokenizer, hook=args.hook,
        sae_format=args.sae_format, explanations=args.explanations, top_k=args.top_k, context=args.context,
        n_bands=args.bands, per_band=args.per_band, reservoir=args.reservoir, hist_bins=args.hist_bins,
        n_logits=args.logits, n_neighbors=args.neighbors, max_tokens=args.max_tokens, context_len=args.context_len,
        batch_contexts=args.batch_contexts, text_field=args.text_field, split=args.split, shard_size=args.shard_size,
        checkpoint_rows=args.checkpoint_rows, seed=args.seed, device=args.device)
    out = build_dashboard(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"dashboard written to {out}; view it with `saeforge dashboard serve {out}` or open {out}/index.html")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from saeforge.dashboard.serve import serve

    if args.port < 0 or args.port > 65535:
        raise SaeforgeError(f"--port {args.port} is not a port; use 0..65535 (0 = any free port)")
    serve(args.dir, port=args.port, host=args.host, announce=lambda msg: print(msg, flush=True))
    return 0
