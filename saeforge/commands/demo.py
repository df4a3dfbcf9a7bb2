"""``saeforge demo``: the main job end to end on ../shared's stories260K model and TinyStories text.

harvest resid_post.2 on train.txt -> train a TopK SAE (width 1024, k 16, 5M tokens) -> evaluate on
valid.txt with the SAE spliced into the model -> print the table. Each stage is the same Python API the
individual commands use, and each resumes: rerunning the demo after a crash continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saeforge.activations.cache import HarvestConfig, harvest
from saeforge.activations.stream import CachedStream
from saeforge.config import parse_size
from saeforge.errors import SaeforgeError
from saeforge.eval import evaluate, format_table
from saeforge.models import load_model
from saeforge.sae import make_config
from saeforge.train import TrainConfig, Trainer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="harvest, train and evaluate a TopK SAE on the shared stories260K model",
        description="End-to-end demo: harvest stories260K's residual stream after block 2 on TinyStories "
                    "train.txt, train a TopK SAE, evaluate it on valid.txt and print the table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shared", default="../shared", help="the shared folder (models/ and data/)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--hook", default="resid_post.2", help="hook point")
    p.add_argument("--width", type=parse_size, default=1024, help="SAE latents")
    p.add_argument("--k", type=int, default=16, help="active latents per token")
    p.add_argument("--tokens", type=parse_size, default="5M", help="training tokens (loops over the harvested cache)")
    p.add_argument("--eval-tokens", type=parse_size, default="200k", help="held-out tokens for evaluation")
    p.add_argument("--dead-tokens", type=parse_size, default="1M",
                   help="tokens without firing before a latent is dead and AuxK takes it up (the demo's "
                        "data is 5M tokens in all, so Gao et al.'s 10M would never trigger)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    shared = Path(args.shared)
    model_path = shared / "models" / "stories260K" / "stories260K.bin"
    train_txt = shared / "data" / "tinystories" / "train.txt"
    valid_txt = shared / "data" / "tinystories" / "valid.txt"
    for p in (model_path, train_txt, valid_txt):
        if not p.exists():
            raise SaeforgeError(f"{p} not found; point --shared at the folder holding models/ and data/")
    out = Path(args.out)
    progress = not args.no_progress
    times = {}

    t = time.perf_counter()
    cache = harvest(HarvestConfig(model=str(model_path), data=str(train_txt), hooks=[args.hook],
                                  out=str(out / "cache"), batch_contexts=256), progress=progress)
    times["harvest_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stream = CachedStream(str(cache), batch_size=4096, hooks=[args.hook], seed=0)
    cfg = make_config("topk", d_in=stream.d[args.hook], d_sae=args.width, k=args.k, hook=args.hook,
                      model=str(model_path))
    tcfg = TrainConfig(total_tokens=parse_size(args.tokens), batch_size=4096,
                       dead_tokens=parse_size(args.dead_tokens), device="cpu")
    trainer = Trainer({"": cfg}, stream, tcfg, out / "sae")
    resume = (out / "sae" / "checkpoint.safetensors").exists()
    sae = trainer.fit(resume=resume, progress=progress)[""]
    times["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = load_model(str(model_path))
    result = evaluate(sae, model, str(valid_txt), n_tokens=parse_size(args.eval_tokens), out=out / "eval",
                      progress=progress)
    times["eval_s"] = time.perf_counter() - t
    print(format_table(result))
    print("times: " + "  ".join(f"{k} {v:.1f}" for k, v in times.items()))
    (out / "times.json").write_text(json.dumps(times, indent=2) + "\n")
    return 0
