"""Flags shared by ``train`` and ``sweep`` (not a subcommand: the leading ``_`` keeps it out of the CLI's scan).

Each flag is generated from its config field (:func:`saeforge.config.config_flag`): the name from the config's
``FLAGS``, the default from the dataclass, so no default is typed twice; ``*_from_args`` rebuild the configs.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from saeforge.activations.stream import StreamConfig
from saeforge.config import config_flag, config_flags, config_values, parse_size
from saeforge.errors import SaeforgeError
from saeforge.train.config import TrainConfig
from saeforge.train.optim import OPTIMIZERS

STREAM_FLAGS = {
    "data": "an activation cache folder from `saeforge harvest`, or a text source (.txt/.jsonl/.parquet/HF "
            "dataset) to stream activations from the model with no cache",
    "model": "model (HF hub id, local folder or llama2.c .bin); needed with text --data",
    "tokenizer": "tokenizer file for llama2.c models (default: tok*.bin beside the model)",
    "context_len": "tokens per context when streaming text (default %(default)s)",
    "text_field": "text field of .jsonl/.parquet/HF data (default %(default)s)",
    "shuffle_buffer": "rows held in the shuffle buffer; bounds memory (default %(default)s)",
}

TRAIN_FLAGS = {
    "total_tokens": "training tokens (default %(default)s; loops the data)",
    "batch_size": "rows per step (default %(default)s); under torchrun the GLOBAL batch, split over the replicas",
    "lr": "learning rate (default: from --lr-rule)",
    "lr_rule": "an unset --lr: scaled = for adam, Gao et al.'s 2e-4/sqrt(n/2^14) transferred to the input width; "
               "for signum, 2.5e-3/sqrt(n/2^14) (docs/recipes/README.md); published = the recipe's own constant "
               "(sparsify's 5e-3/sqrt(n/2^14) for signum)",
    "optimizer": "adam, or signum = schedule-free sign descent as sparsify (saeforge/train/optim.py); default: the "
                 "architecture's (signum for topk, batchtopk, matryoshka; adam for the others; docs/recipes/README.md)",
    "momentum": "signum: the schedule-free interpolation beta (default %(default)s, as sparsify)",
    "average_power": "signum: iterate k weighs (k+1)^r in the schedule-free average (default 2, measured; the "
                     "paper's and sparsify's 0 weigh all iterates alike; docs/recipes/README.md)",
    "warmup_steps": "LR warm-up steps (default: adam min(1000, 5%% of steps); signum 0)",
    "decay_frac": "linear LR decay to 0 over the last fraction of steps (default: adam 0.2; signum 0)",
    "grad_clip": "gradient-norm clip, 0 to disable (default %(default)s)",
    "dead_tokens": "tokens without firing before a latent counts as dead (default 10M as Gao et al., or a tenth "
                   "of a shorter run, with adam; 6 per latent with signum, docs/recipes/README.md)",
    "log_every": "steps between metric lines (default %(default)s)",
    "checkpoint_every": "steps between checkpoints (default %(default)s)",
    "seed": "random seed",
    "device": "auto (cuda if present, else cpu), cpu, cuda, cuda:1, mps",
    "dtype": "autocast dtype: auto (bf16 on CUDA, and on CPUs with AMX/AVX512-BF16 for inputs at least 512 wide, "
             "where it measured faster at the same FVU; else fp32), float32, bfloat16",
    "kernels": "sparse: the sparse training kernels where the architecture has them (TopK, BatchTopK, JumpReLU's "
               "decoder; docs/performance.md); dense: plain autograd (same numbers, slower)",
    "shard_latents": "under torchrun: split each SAE's latents over S processes (tensor parallel over d_sae; topk "
                     "only); the processes form replicas x S (data parallel x latent shards); bare flag: all "
                     "processes (docs/distributed.md). Without torchrun: ignored",
    "dp_read": "under torchrun, how the replicas read a cache: exact = every replica reads every shard and keeps its "
               "rows (resumes with any number of processes); disjoint = each reads only its own shards (1/R of the "
               "I/O; resumes only with the same number of replicas). Default %(default)s",
}
_TRAIN_KW = {
    "total_tokens": {"type": parse_size}, "batch_size": {"type": parse_size}, "dead_tokens": {"type": parse_size},
    "lr_rule": {"choices": ["scaled", "published"]}, "optimizer": {"choices": list(OPTIMIZERS)},
    "kernels": {"choices": ["sparse", "dense"]},
    "shard_latents": {"nargs": "?", "const": 0, "metavar": "S"}, "dp_read": {"choices": ["exact", "disjoint"]},
}


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SaeforgeError(f"--set {item!r} needs the form key=value")
        k, v = item.split("=", 1)
        try:
            value = json.loads(v)
        except json.JSONDecodeError:
            value = v
        if isinstance(value, float) and not math.isfinite(value):
            raise SaeforgeError(f"--set {item!r}: {k.strip()} must be a finite number")
        out[k.strip()] = value
    return out


def add_stream_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    config_flags(g, StreamConfig, STREAM_FLAGS, shuffle_buffer={"type": parse_size})


def stream_config_from_args(args: argparse.Namespace) -> StreamConfig:
    return StreamConfig(**config_values(StreamConfig, args, STREAM_FLAGS))


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    config_flags(g, TrainConfig, TRAIN_FLAGS, **_TRAIN_KW)
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (every setting must match the run's)")
    g.add_argument("--allow-change", action="append", metavar="FIELD[,FIELD]", default=[],
                   help="with --resume: let these settings differ from the checkpoint's: total_tokens (a longer "
                        "or shorter budget), log_every, checkpoint_every, device")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace, spread: bool = False) -> TrainConfig:
    return TrainConfig(**config_values(TrainConfig, args, TRAIN_FLAGS), spread=spread)


def allowed_changes(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(f.strip().replace("-", "_") for v in args.allow_change or [] for f in v.split(",") if f.strip())
