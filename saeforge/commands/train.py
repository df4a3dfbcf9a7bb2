"""``saeforge train``: train one SAE from an activation cache, or straight from a model and a corpus."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from saeforge import tracking
from saeforge.config import ArgError, finite_float, parse_size  # noqa: F401  (re-exported for the commands)
from saeforge.errors import SaeforgeError


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
    g.add_argument("--data",
                   help="an activation cache folder from `saeforge harvest`, or a text source (.txt/.jsonl/"
                        ".parquet/HF dataset) to stream activations from the model with no cache")
    g.add_argument("--model", help="model (HF hub id, local folder or llama2.c .bin); needed with text --data")
    g.add_argument("--tokenizer", help="tokenizer file for llama2.c models (default: tok*.bin beside the model)")
    g.add_argument("--context-len", type=int, default=128, help="tokens per context when streaming text (default 128)")
    g.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF data (default text)")
    g.add_argument("--shuffle-buffer", type=parse_size, default=262144,
                   help="rows held in the shuffle buffer; bounds memory (default 262144)")


def open_training_stream(args: argparse.Namespace, hooks: list[str], batch_size: int, seed: int):
    from saeforge import distributed as dist
    from saeforge.activations.stream import CachedStream, LiveStream

    dist.init(getattr(args, "device", None))  # under torchrun: before the model lands on this rank's GPU
    data = Path(args.data)
    if data.is_dir() and (data / "manifest.json").exists():
        return CachedStream(str(data), batch_size=batch_size, hooks=hooks, shuffle_buffer=args.shuffle_buffer,
                            seed=seed)
    if not args.model:
        raise SaeforgeError(f"{args.data} is not an activation cache; pass --model to stream from text")
    from saeforge.device import resolve_device
    from saeforge.models import load_model

    model = load_model(args.model, tokenizer=args.tokenizer, device=resolve_device(getattr(args, "device", None)))
    return LiveStream(model, hooks, args.data, batch_size=batch_size, context_len=args.context_len,
                      shuffle_buffer=args.shuffle_buffer, seed=seed, text_field=args.text_field)


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--tokens", type=parse_size, default=5_000_000, help="training tokens (default 5M; loops the data)")
    g.add_argument("--batch-size", type=parse_size, default=4096,
                   help="rows per step (default 4096); under torchrun the GLOBAL batch, split over the replicas")
    g.add_argument("--lr", type=finite_float, help="learning rate (default: from --lr-rule)")
    g.add_argument("--lr-rule", choices=["scaled", "published"], default="scaled",
                   help="an unset --lr: scaled = Gao et al.'s 2e-4/sqrt(n/2^14) transferred to the input width "
                        "(every architecture; docs/recipes/README.md); published = the recipe's own constant")
    g.add_argument("--warmup-steps", type=int, help="LR warm-up steps (default min(1000, 5%% of steps))")
    g.add_argument("--decay-frac", type=finite_float, default=0.2, help="linear LR decay over the last fraction (default 0.2)")
    g.add_argument("--grad-clip", type=finite_float, default=1.0, help="gradient-norm clip, 0 to disable (default 1)")
    g.add_argument("--dead-tokens", type=parse_size, default=None,
                   help="tokens without firing before a latent counts as dead (default 10M as Gao et al., or a "
                        "tenth of a shorter run)")
    g.add_argument("--log-every", type=int, default=25, help="steps between metric lines (default 25)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto",
                   help="autocast dtype: auto (bf16 on CUDA, and on CPUs with AMX/AVX512-BF16 for inputs at least "
                        "512 wide, where it measured faster at the same FVU; else fp32), float32, bfloat16")
    g.add_argument("--kernels", choices=["sparse", "dense"], default="sparse",
                   help="sparse: the sparse training kernels where the architecture has them (TopK, BatchTopK, "
                        "JumpReLU's decoder; docs/performance.md); dense: plain autograd (same numbers, slower)")
    g.add_argument("--shard-latents", type=int, nargs="?", const=0, default=1, metavar="S",
                   help="under torchrun: split each SAE's latents over S processes (tensor parallel over d_sae; "
                        "topk only); the processes form replicas x S (data parallel x latent shards); bare flag: "
                        "all processes (docs/distributed.md). Without torchrun: ignored")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (every setting must match the run's)")
    g.add_argument("--allow-change", action="append", metavar="FIELD[,FIELD]", default=[],
                   help="with --resume: let these settings differ from the checkpoint's: total_tokens (a longer "
                        "or shorter budget), log_every, checkpoint_every, device")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def allowed_changes(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(f.strip().replace("-", "_") for v in getattr(args, "allow_change", None) or []
                 for f in v.split(",") if f.strip())


def check_width_args(args: argparse.Namespace) -> None:
    for flag, value in (("--width", args.width), ("--expansion", args.expansion), ("--k", args.k)):
        if value is not None and value < 1:
            raise SaeforgeError(f"{flag} {value} must be a positive whole number")


def train_config_from_args(args: argparse.Namespace):
    from saeforge.train import TrainConfig

    return TrainConfig(
        total_tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, lr_rule=args.lr_rule,
        warmup_steps=args.warmup_steps,
        decay_frac=args.decay_frac, grad_clip=args.grad_clip, dead_tokens=args.dead_tokens,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
        dtype=args.dtype, kernels=args.kernels, shard_latents=args.shard_latents,
        spread=bool(getattr(args, "spread", False)),
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train an SAE (any architecture) on activations",
        description="Train one SAE. Data comes from a cache written by `saeforge harvest` or straight from "
                    "the model. Writes OUT/cfg.json, OUT/sae.safetensors, OUT/metrics.jsonl and a checkpoint "
                    "that --resume continues from.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_stream_args(p)
    g = p.add_argument_group("SAE")
    g.add_argument("--hook", help="input hook point, e.g. resid_post.2 (default: the cache's only hook)")
    g.add_argument("--target", help="target hook point for a transcoder (default: reconstruct --hook)")
    g.add_argument("--arch", default="topk", help="architecture: see `saeforge train --list-archs`")
    g.add_argument("--width", type=parse_size, help="number of latents (default: 16 x input width)")
    g.add_argument("--expansion", type=int, default=16, help="latents per input dimension when --width is unset")
    g.add_argument("--k", type=int, help="active latents per token (topk, batchtopk, matryoshka)")
    g.add_argument("--recipe", help="the architecture's recipe option, e.g. relu: anthropic2024 | monosemanticity; "
                                    "jumprelu: anthropic2025 | gemmascope (see docs/recipes)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other field of the architecture's config, e.g. --set multi_topk=true (repeatable)")
    g.add_argument("--list-archs", action="store_true", help="print the architectures and their options, then exit")
    g.add_argument("--objective", choices=["mse", "kl"], default="mse",
                   help="mse: reconstruct activations (the recipe's loss); kl: end-to-end, train the SAE "
                        "spliced into the model on KL(clean || spliced) next-token distributions (needs --model "
                        "and text --data; the baseline of `saeforge adapt`)")
    g.add_argument("--init-sae", help="with --objective kl: start from this SAE (any format) instead of a fresh one")
    add_train_args(p)
    tracking.add_args(p)
    p.add_argument("--out", default="runs/sae", help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from saeforge.sae import architectures, make_config
    from saeforge.train import Trainer

    if args.list_archs:
        for name, cls in sorted(architectures().items()):
            fields = [f.name for f in dataclasses.fields(cls.config_class)]
            print(f"{name:12s} {cls.config_class.__name__}: {', '.join(fields)}")
        return 0
    if not args.data:
        raise SaeforgeError("--data is required: an activation cache folder or a text source")
    tcfg = train_config_from_args(args)  # validated before any data or model is opened
    track = tracking.from_args(args)
    if args.objective == "kl":
        return run_kl(args)
    if args.hook and "," in args.hook:
        return run_crosscoder(args)
    check_width_args(args)
    hooks = [h for h in (args.hook, args.target) if h]
    stream = open_training_stream(args, hooks or None, args.batch_size, args.seed)
    hook = args.hook or (stream.hooks[0] if len(stream.hooks) == 1 else None)
    if hook is None:
        raise SaeforgeError(f"the data has several hooks {stream.hooks}; choose one with --hook")
    d_in = stream.d[hook]
    d_out = stream.d[args.target] if args.target else None
    width = args.width if args.width is not None else args.expansion * d_in
    opts = parse_sets(args.set)
    if args.k is not None:
        opts["k"] = args.k
    if args.recipe:
        opts["recipe"] = args.recipe
    if args.target and args.target != hook:
        opts.setdefault("apply_b_dec_to_input", False)
    model_spec = getattr(stream, "model_spec", None) or args.model
    cfg = make_config(args.arch, d_in=d_in, d_sae=width, d_out=d_out, hook=hook, target_hook=args.target,
                      model=model_spec, **opts)
    trainer = Trainer({"": cfg}, stream, tcfg, args.out, track)
    trainer.fit(resume=args.resume, progress=not args.no_progress, allow_changes=allowed_changes(args))
    last = trainer.out / "metrics.jsonl"
    if last.exists() and trainer.par.writer:
        rec = json.loads(last.read_text().splitlines()[-1])
        print(f"saved {args.out}: fvu {rec['fvu']:.4f}  l0 {rec['l0']:.1f}  dead {rec['dead_frac']:.1%}")
    return 0


def run_kl(args: argparse.Namespace) -> int:
    """End-to-end SAE training through the model on the KL objective (saeforge.adapt with trainable="sae")."""
    from saeforge.adapt import AdaptConfig, build, fit, save
    from saeforge.models import load_model
    from saeforge.sae import make_config

    if not args.model:
        raise SaeforgeError("--objective kl needs --model (the SAE is trained spliced into it)")
    out = Path(args.out)
    init = args.init_sae
    if init is None:
        if not args.hook:
            raise SaeforgeError("--objective kl without --init-sae needs --hook to place a fresh SAE")
        loaded = load_model(args.model, tokenizer=args.tokenizer)
        opts = parse_sets(args.set)
        if args.k is not None:
            opts["k"] = args.k
        cfg = make_config(args.arch, d_in=loaded.d_model, d_sae=args.width or args.expansion * loaded.d_model,
                          hook=args.hook, model=args.model, **opts)
        from saeforge.activations.stream import LiveStream
        from saeforge.sae import create_sae

        sae = create_sae(cfg)
        sample = next(iter(LiveStream(loaded, [args.hook], args.data, batch_size=16384, context_len=args.context_len,
                                      seed=args.seed, text_field=args.text_field).iterate(0)))
        x = sample.acts[args.hook]
        sae.init_from_data(x, x)
        init = str(sae.save(out / "init", fold=False))
    lr = args.lr if args.lr is not None else 5e-5
    acfg = AdaptConfig(model=args.model, tokenizer=args.tokenizer, saes=[init], data=args.data, trainable="sae",
                       lr=lr, tokens=args.tokens, context_len=args.context_len, grad_clip=args.grad_clip,
                       seed=args.seed, device=args.device, text_field=args.text_field,
                       checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    ad = build(acfg)
    fit(ad, acfg, out, resume=args.resume, progress=not args.no_progress, tracking=tracking.from_args(args))
    save(ad, acfg, out)
    ad.saes[0].save(out)
    print(f"saved {out} (end-to-end SAE on KL; also in {out}/saes/0)")
    return 0


def run_crosscoder(args: argparse.Namespace) -> int:
    """``--hook a,b,c``: one crosscoder reading and reconstructing all the hooks (``--arch crosscoder``)."""
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    hooks = [h.strip() for h in args.hook.split(",") if h.strip()]
    if args.arch != "crosscoder":
        raise SaeforgeError(f"several hooks ({', '.join(hooks)}) need --arch crosscoder, not {args.arch}")
    stream = open_training_stream(args, hooks, args.batch_size, args.seed)
    widths = {stream.d[h] for h in hooks}
    if len(widths) != 1:
        raise SaeforgeError(f"crosscoder hooks must share a width, got {dict((h, stream.d[h]) for h in hooks)}")
    d_in = len(hooks) * widths.pop()  # a crosscoder's d_in is n_hooks × the hook width (CrosscoderConfig)
    opts = parse_sets(args.set)
    if args.k is not None:
        opts["k"] = args.k
    if args.recipe:
        opts["recipe"] = args.recipe
    width = args.width if args.width is not None else args.expansion * d_in
    cfg = make_config("crosscoder", d_in=d_in, d_sae=width, hooks=hooks,
                      model=getattr(stream, "model_spec", None) or args.model, **opts)
    trainer = Trainer({"": cfg}, stream, train_config_from_args(args), args.out, tracking.from_args(args))
    trainer.fit(resume=args.resume, progress=not args.no_progress, allow_changes=allowed_changes(args))
    if trainer.par.writer:
        print(f"saved crosscoder over {len(hooks)} hooks to {args.out}")
    return 0
