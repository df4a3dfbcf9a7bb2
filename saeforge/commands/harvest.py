"""``saeforge harvest``: run a model over text and store hooked activations as a resumable cache."""
from __future__ import annotations

import argparse

from saeforge.activations.cache import STORE_DTYPES, HarvestConfig
from saeforge.config import parse_size
from saeforge.activations.cache import ActivationCache, harvest
from saeforge import distributed as dist

HELP = "run a model over text and save activations at hook points to a resumable on-disk cache"

EPILOG = """\
The cache folder holds manifest.json and shard_NNNNN.safetensors files (see docs/cache.md). If a run
is interrupted, run the same command again: finished shards are checked and kept, and the harvest
continues where it stopped; the result is byte-identical to an uninterrupted run. Under torchrun
(`torchrun --nproc-per-node N -m saeforge harvest ...`) each process runs the forward passes of every
N-th shard and the result is the same cache, byte for byte (docs/distributed.md). Running it on a
finished cache does nothing. A different configuration for an existing folder is refused.

example:
  saeforge harvest --model stories260K.bin --data train.txt --hooks resid_post.2 \\
      --out runs/acts --max-tokens 1000000
"""


def _hooks(values: list[str]) -> list[str]:
    return [h.strip() for v in values for h in v.split(",") if h.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    d = HarvestConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "harvest", help=HELP, description=HELP + ".", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="model: a llama2.c .bin (tokenizer found beside it), a local Hugging Face folder or a hub id")
    p.add_argument("--tokenizer", default=None,
                   help="override the tokenizer (a llama2.c tokenizer .bin or anything AutoTokenizer loads); "
                        "default: the model's own")
    p.add_argument("--data", required=True,
                   help="text: a .txt file (documents separated by blank lines), .jsonl, .parquet, a folder of "
                        "those, or a Hugging Face data set name / saved folder")
    p.add_argument("--hooks", required=True, action="append", metavar="HOOK[,HOOK...]",
                   help="hook points, comma-separated or repeated, e.g. resid_post.2 or model.layers.2.mlp:in")
    p.add_argument("--out", required=True, help="cache folder to create (or to resume)")
    p.add_argument("--context-len", type=int, default=d["context_len"].default,
                   help="tokens per context, BOS included (default: %(default)s)")
    p.add_argument("--batch-contexts", type=int, default=d["batch_contexts"].default,
                   help="contexts per forward pass (default: %(default)s)")
    p.add_argument("--shard-tokens", type=parse_size, default=d["shard_tokens"].default,
                   help="approximate rows per shard file, rounded to whole forward batches (default: %(default)s)")
    p.add_argument("--max-tokens", type=parse_size, default=None,
                   help="stop after this many stored rows, e.g. 200k or 5M (default: the whole data set)")
    p.add_argument("--dtype", choices=list(STORE_DTYPES), default=d["dtype"].default,
                   help="storage dtype of the activations; the model itself runs in float32 (default: %(default)s)")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the model's weights for the forward passes (bf16/fp16 for big models; changes "
                        "the activations, so it is part of the cache's identity) (default: %(default)s)")
    p.add_argument("--device-map", default=None,
                   help="Hugging Face models too big for one GPU: place the layers over the node's GPUs with "
                        "accelerate, e.g. --device-map auto (replaces --device)")
    p.add_argument("--device", default=d["device"].default,
                   help="device for the model's forward passes: cpu, cuda, cuda:1, mps, auto (default: %(default)s)")
    p.add_argument("--text-field", default=d["text_field"].default,
                   help="field/column holding the text in .jsonl/.parquet/data sets (default: %(default)s)")
    p.add_argument("--split", default=d["split"].default,
                   help="data set split for Hugging Face data sets (default: %(default)s)")
    p.add_argument("--keep-special", action="store_true",
                   help="also store rows at BOS/EOS/special tokens (default: only ordinary text tokens)")
    p.add_argument("--on-nonfinite", choices=["error", "skip"], default="error",
                   help="rows where the model gives NaN/Inf activations: error (refuse, naming their documents "
                        "and positions) or skip (leave them out of the cache) (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = HarvestConfig(
        model=args.model, data=args.data, hooks=_hooks(args.hooks), out=args.out, tokenizer=args.tokenizer,
        text_field=args.text_field, split=args.split, context_len=args.context_len,
        batch_contexts=args.batch_contexts, shard_tokens=args.shard_tokens, max_tokens=args.max_tokens,
        dtype=args.dtype, device=args.device, keep_special=args.keep_special,
        on_nonfinite=args.on_nonfinite, model_dtype=args.model_dtype, device_map=args.device_map,
    )

    out = harvest(cfg, progress=not args.quiet)
    if not dist.is_main():  # under torchrun: one cache, one summary line
        return 0
    cache = ActivationCache(out)
    widths = ", ".join(f"{h} (d={n})" for h, n in cache.d.items())
    print(f"harvested {cache.n_tokens} tokens x {widths} into {out} ({cache.n_shards} shards)")
    return 0
