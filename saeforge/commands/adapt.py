"""``saeforge adapt``: LoRA-adapt a model around frozen SAEs (Chen, Engels & Tegmark 2025)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from saeforge import tracking
from saeforge.adapt.config import AdaptConfig
from saeforge.adapt.report import adapt_report, report_markdown
from saeforge.config import config_flag, config_flags, config_values, parse_size
from saeforge.errors import SaeforgeError
from saeforge.formats import load_sae
from saeforge.io import write_json_atomic, write_text_atomic

CONFIG_FIELDS = ("rank", "alpha", "dropout", "layers", "target_modules", "replace_special", "lr", "lr_schedule",
                 "tokens", "batch_contexts", "context_len", "checkpoint_every", "device", "model_dtype", "device_map",
                 "seed")


def _csv(text: str) -> list[str]:
    return text.split(",")


def _report(ad, data: str, args, cfg_replace_special: bool) -> dict:
    return adapt_report(ad.loaded.model, ad.loaded.tokenizer, ad.saes, ad.hooks, data, ad.adapter_off,
                        n_tokens=parse_size(args.eval_tokens), context_len=args.context_len,
                        replace_special=cfg_replace_special, progress=not args.no_progress)


def _write_report(out: Path, rep: dict) -> None:
    write_json_atomic(out / "report.json", rep)
    write_text_atomic(out / "report.md", report_markdown(rep))
    print(report_markdown(rep))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="LoRA-adapt the model around frozen SAEs, evaluate, merge",
                       description="Fine-tune LoRA adapters so the model works well with SAEs spliced in "
                                   "(Chen, Engels & Tegmark 2025). Objective: KL(clean model || spliced + LoRA).")
    s = p.add_subparsers(dest="adapt_command", metavar="ACTION")

    t = s.add_parser("train", help="train an adapter around one or more SAEs, then report",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", help="model spec (default: the first SAE's cfg.model; one the SAEs do not name "
                                   "runs with a warning)")
    t.add_argument("--tokenizer", help="tokenizer override (llama2.c .bin or HF)")
    t.add_argument("--sae", action="append", required=True, help="SAE folder, any format (repeatable)")
    t.add_argument("--hook", action="append", dest="hooks",
                   help="input hook of the SAE(s), e.g. resid_post.2 or blocks.2.hook_resid_post: once for all, or "
                        "once per --sae in order (default: each SAE's own cfg.hook)")
    t.add_argument("--data", required=True, help="training text (.txt/.jsonl/.parquet/HF dataset)")
    t.add_argument("--eval-data", help="held-out text for the report (default: --data)")
    config_flags(t, AdaptConfig, {
        "rank": "LoRA rank, capped at half the smaller side of each matrix",
        "alpha": "LoRA alpha",
        "dropout": "LoRA dropout",
        "layers": "adapt all blocks, or only the blocks after the first SAE",
        "target_modules": "comma-separated projection names (default: the family's q,k,v,o,gate,up,down)",
        "replace_special": "splice the SAE at BOS/special positions too (default: they keep the original activation)",
        "lr": "AdamW learning rate",
        "lr_schedule": "constant: the paper's; cosine/linear: 5%% warm-up, then decay to 0 over the run",
        "tokens": "training token budget",
        "batch_contexts": "contexts per step",
        "context_len": "tokens per context",
    }, layers={"choices": ["all", "after"]}, target_modules={"type": _csv},
        lr_schedule={"choices": ["constant", "cosine", "linear"]}, tokens={"type": parse_size})
    t.add_argument("--eval-tokens", type=parse_size, default="100k", help="held-out tokens for the report")
    config_flags(t, AdaptConfig, {
        "checkpoint_every": "steps between checkpoints",
        "device": "auto, cpu, cuda, cuda:1, mps",
        "model_dtype": "dtype of the frozen model's weights (bf16/fp16 for big models)",
        "device_map": "HF models: spread the layers over the node's GPUs through accelerate, e.g. auto "
                      "(replaces --device)",
        "seed": "random seed",
    }, model_dtype={"choices": ["float32", "bfloat16", "float16"]})
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", default="runs/adapt", help="output folder")
    tracking.add_args(t)
    t.set_defaults(func=run_train)

    e = s.add_parser("eval", help="re-evaluate a saved adapter (model + adapter + SAEs)",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("path", help="folder written by `saeforge adapt train`")
    e.add_argument("--data", help="held-out text (default: the training run's --eval-data)")
    e.add_argument("--eval-tokens", type=parse_size, default="100k", help="held-out tokens")
    config_flag(e, AdaptConfig, "context_len", "tokens per context")
    e.add_argument("--device", default="auto")
    config_flag(e, AdaptConfig, "device_map", "HF models: spread the layers over the node's GPUs, e.g. auto")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_eval)

    m = s.add_parser("merge", help="merge the adapter into the model weights (a plain HF folder)")
    m.add_argument("path", help="folder written by `saeforge adapt train`")
    m.add_argument("--out", required=True, help="output model folder")
    m.set_defaults(func=run_merge)
    p.set_defaults(func=lambda a: p.print_help() or 1)


def run_train(args: argparse.Namespace) -> int:
    from saeforge.adapt.trainer import build, fit, save  # peft and transformers load only when used

    model = args.model or load_sae(args.sae[0], device="cpu").cfg.model
    if not model:
        raise SaeforgeError(f"{args.sae[0]} does not record its model (the SAE names none); pass --model")
    cfg = AdaptConfig(model=model, saes=list(args.sae), hooks=args.hooks, data=args.data, tokenizer=args.tokenizer,
                      **config_values(AdaptConfig, args, CONFIG_FIELDS))
    out = Path(args.out)
    track = tracking.from_args(args)  # its library checked before the model is loaded
    ad = build(cfg)
    fit(ad, cfg, out, resume=args.resume, progress=not args.no_progress, tracking=track)
    rep = _report(ad, args.eval_data or args.data, args, cfg.replace_special)
    rep["eval_data"] = args.eval_data or args.data
    save(ad, cfg, out, rep)
    _write_report(out, rep)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from saeforge.adapt.trainer import load  # peft and transformers load only when used

    ad = load(args.path, device=args.device, device_map=args.device_map)
    manifest = json.loads((Path(args.path) / "adapt.json").read_text())
    data = args.data or (manifest.get("report") or {}).get("eval_data") or manifest["config"]["data"]
    rep = _report(ad, data, args, manifest["config"].get("replace_special", False))
    rep["eval_data"] = data
    _write_report(Path(args.path), rep)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from saeforge.adapt.trainer import merge  # peft and transformers load only when used

    out = merge(args.path, args.out)
    print(f"merged model written to {out} (load it with saeforge.models.load_model('{out}'"
          f"{', tokenizer=' + repr(str(out / 'tokenizer.bin')) if (out / 'tokenizer.bin').exists() else ''}))")
    return 0
