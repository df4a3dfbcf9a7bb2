"""``saeforge convert SRC DST --to FORMAT``: read an SAE in any supported format, write it in another."""
from __future__ import annotations

import argparse
from saeforge import formats
from saeforge.formats import canonical_format
from saeforge.errors import SaeforgeError
from saeforge.lock import LOCK_FILE, folder_lock

FORMAT_HELP = "saeforge, saelens, sparsify, dictionary_learning, gemma_scope, openai"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an SAE checkpoint between formats (SAELens, sparsify, dictionary_learning, Gemma Scope, "
             "OpenAI, saeforge)",
        description="Read SRC (a local folder/file or a Hugging Face Hub id owner/repo[/folder]) and write it to "
                    "DST in --to FORMAT. The source format is detected from the files unless --from is given. "
                    "Conventions that differ between formats (weight orientation, b_dec subtraction, decoder-norm "
                    "folding, threshold storage) are converted exactly; see docs/formats.md.",
    )
    p.add_argument("src", help="checkpoint folder or file, or a Hub id like google/gemma-scope-2b-pt-res/layer_0/...")
    p.add_argument("dst", help="output folder (or .npz / .pt file for gemma_scope / openai)")
    p.add_argument("--to", required=True, help=f"output format: {FORMAT_HELP}")
    p.add_argument("--from", dest="from_format", help=f"input format (default: detected): {FORMAT_HELP}")
    p.add_argument("--hookpoint", help="which hook point of a sparsify run folder to read")
    p.add_argument("--out-hookpoint",
                   help="with --to sparsify: write a run folder DST/<name>/ plus config.json instead of one coder")
    p.add_argument("--subfolder", help="folder inside SRC (or inside the Hub repo) that holds the checkpoint")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a Hub id")
    p.add_argument("--overwrite", action="store_true",
                   help="write into DST even when it already holds files (they may be replaced or left beside "
                        "the converted SAE); without it a non-empty DST is refused")
    p.add_argument("--normalize-decoder", action="store_true",
                   help="dictionary_learning AutoEncoder: unit-normalise decoder columns as load_dictionary does")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from pathlib import Path


    to = canonical_format(args.to)
    dst = Path(args.dst)
    if dst.is_dir() and any(p.name != LOCK_FILE for p in dst.iterdir()) and not args.overwrite:
        raise SaeforgeError(f"{dst} is not empty (it holds {', '.join(sorted(p.name for p in dst.iterdir())[:3])}"
                            "...); pick an empty or new DST, or pass --overwrite")
    if dst.is_file() and not args.overwrite:
        raise SaeforgeError(f"{dst} already exists; pick a new DST or pass --overwrite")
    if dst.suffix in (".npz", ".pt") or dst.is_file():  # a single-file format: nothing to lock
        return _convert(args, to)
    with folder_lock(dst, "convert", transient=True):
        return _convert(args, to)


def _convert(args: argparse.Namespace, to: str) -> int:
    sae, written = formats.convert(
        args.src, args.dst, to, from_format=args.from_format, hookpoint=args.hookpoint,
        subfolder=args.subfolder, revision=args.revision, normalize_decoder=args.normalize_decoder,
        out_hookpoint=args.out_hookpoint,
    )
    c = sae.cfg
    src_fmt = (c.metadata or {}).get("source_format", "saeforge")
    print(f"converted {args.src} ({src_fmt}, {c.arch}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}) "
          f"-> {written} ({to})")
    return 0
