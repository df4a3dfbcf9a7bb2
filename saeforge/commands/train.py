"""``saeforge train``: train one SAE from an activation cache, or straight from a model and a corpus."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from saeforge import tracking
from saeforge.activations.stream import open_stream
from saeforge.adapt.config import AdaptConfig
from saeforge.commands._flags import (
    add_stream_args, add_train_args, allowed_changes, parse_sets, stream_config_from_args, train_config_from_args,
)
from saeforge.config import field_default, parse_size
from saeforge.errors import SaeforgeError
from saeforge.models import load_model
from saeforge.sae import architectures, make_config
from saeforge.train import Trainer


def check_width_args(args: argparse.Namespace) -> None:
    for flag, value in (("--width", args.width), ("--expansion", args.expansion), ("--k", args.k)):
        if value is not None and value < 1:
            raise SaeforgeError(f"{flag} {value} must be a positive whole number")


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
    stream = open_stream(stream_config_from_args(args), hooks or None, tcfg.batch_size, tcfg.seed, tcfg.device)
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
    model_spec = stream.model_spec or args.model
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
    """``--objective kl``: end-to-end SAE training through the model (:mod:`saeforge.adapt.e2e`)."""
    from saeforge.adapt.e2e import fresh_sae, train_e2e  # peft and transformers load only when used

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
        sae = fresh_sae(loaded, cfg, args.data, context_len=args.context_len, seed=args.seed,
                        text_field=args.text_field)
        init = str(sae.save(out / "init", fold=False))
    lr = args.lr if args.lr is not None else field_default(AdaptConfig, "lr")
    acfg = AdaptConfig(model=args.model, tokenizer=args.tokenizer, saes=[init], data=args.data, trainable="sae",
                       lr=lr, tokens=args.tokens, context_len=args.context_len, grad_clip=args.grad_clip,
                       seed=args.seed, device=args.device, text_field=args.text_field,
                       checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    train_e2e(acfg, out, resume=args.resume, progress=not args.no_progress, tracking=tracking.from_args(args))
    print(f"saved {out} (end-to-end SAE on KL; also in {out}/saes/0)")
    return 0


def run_crosscoder(args: argparse.Namespace) -> int:
    """``--hook a,b,c``: one crosscoder reading and reconstructing all the hooks (``--arch crosscoder``)."""
    hooks = [h.strip() for h in args.hook.split(",") if h.strip()]
    if args.arch != "crosscoder":
        raise SaeforgeError(f"several hooks ({', '.join(hooks)}) need --arch crosscoder, not {args.arch}")
    tcfg = train_config_from_args(args)
    stream = open_stream(stream_config_from_args(args), hooks, tcfg.batch_size, tcfg.seed, tcfg.device)
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
                      model=stream.model_spec or args.model, **opts)
    trainer = Trainer({"": cfg}, stream, tcfg, args.out, tracking.from_args(args))
    trainer.fit(resume=args.resume, progress=not args.no_progress, allow_changes=allowed_changes(args))
    if trainer.par.writer:
        print(f"saved crosscoder over {len(hooks)} hooks to {args.out}")
    return 0
