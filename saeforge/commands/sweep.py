"""``saeforge sweep``: train a grid of SAEs (architectures × widths × k or λ) from ONE pass over the data.

The command line over :mod:`saeforge.train.sweep` (``build_grid``, ``run_sweep``): each SAE lands in
``OUT/<name>`` and ``OUT/sweep.json`` indexes them with their final metrics.

Example::

    saeforge sweep --data cache/ --hook resid_post.2 --arch topk,batchtopk,relu \\
        --width 512,1024 --k 8,16,32 --lam 1,5 --tokens 20M --out runs/sweep
"""
from __future__ import annotations

import argparse
from pathlib import Path

from saeforge import distributed as dist
from saeforge.activations.stream import open_stream
from saeforge.commands._flags import (
    add_stream_args, add_train_args, allowed_changes, parse_sets, stream_config_from_args, train_config_from_args,
)
from saeforge.errors import SaeforgeError
from saeforge.tracking import add_args as tracking_args, from_args as tracking_from_args
from saeforge.train.sweep import build_grid, parse_list, run_sweep


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
    train_cfg = train_config_from_args(args, spread=args.spread)  # validated before any data is opened
    track = tracking_from_args(args)
    hooks = parse_list(args.hooks)
    wanted = sorted({h for h in [args.hook, args.target, *hooks] if h}) or None
    stream = open_stream(stream_config_from_args(args), wanted, train_cfg.batch_size, train_cfg.seed, train_cfg.device)
    hook = args.hook or (stream.hooks[0] if len(stream.hooks) == 1 else None)
    grid = build_grid(
        parse_list(args.arch), parse_list(args.width, "count"), parse_list(args.k, int), parse_list(args.lam, float),
        d=stream.d,
        hook=hook, target=args.target, hooks=hooks, sets=parse_sets(args.set), recipe=args.recipe,
        model=stream.model_spec or args.model,
    )
    index = run_sweep(grid, stream, train_cfg, args.out, resume=args.resume, progress=not args.no_progress,
                      allow_changes=allowed_changes(args), tracking=track)
    if not dist.is_main():
        return 0
    for e in index["saes"]:
        f = e["final"]
        print(f"{e['name']:40s} fvu {f.get('fvu', float('nan')):.4f}  l0 {f.get('l0', float('nan')):.1f}  "
              f"dead {f.get('dead_frac', float('nan')):.1%}")
    print(f"wrote {Path(args.out) / 'sweep.json'}")
    return 0
