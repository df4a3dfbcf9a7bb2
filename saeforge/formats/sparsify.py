"""EleutherAI sparsify checkpoints (``eai-sparsify`` 1.3.3).

One sparse coder is a folder with ``cfg.json`` (``SparseCoderConfig`` + ``d_in``) and ``sae.safetensors``
(``SparseCoder.save_to_disk``); a training run holds one such folder per hook point next to the run-level
``config.json`` (``TrainConfig``). Tensors: ``encoder.weight [d_sae, d_in]`` + ``encoder.bias`` (an
``nn.Linear``, so the transpose of saeforge's ``W_enc``), ``W_dec [d_sae, d_in]`` (rows = latents, like
saeforge), ``b_dec``, optional ``W_skip [d_in, d_in]`` (``forward`` adds ``x @ W_skip.T``).

Maths: ReLU *then* top-k (the same dense codes as saeforge's top-k-then-ReLU). An autoencoder **always**
subtracts ``b_dec`` before encoding (``normalize_decoder`` is only a training-time constraint; sae_lens's
converter gets this wrong, see the fixtures README); a transcoder (``transcode: true``) never does.

Hook names: an autoencoder's hook is the hook point; a transcoder reads the hook point's input and predicts
its output, so it loads as ``hook="<hp>:in"``, ``target_hook="<hp>"`` (saeforge.hooks naming).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    SPARSIFY,
    build_sae,
    export_tensors,
    read_json,
    require,
    require_plain_input,
    source_metadata,
    spec_of,
)
from saeforge.io import save_safetensors_atomic, write_json_atomic
from saeforge.sae import SAE

CFG, WEIGHTS, RUN_CFG = "cfg.json", "sae.safetensors", "config.json"
CODER_KEYS = ("activation", "expansion_factor", "num_latents", "k", "transcode", "skip_connection")
# TrainConfig defaults of sparsify 1.3.3, used when a run-level config.json is written from scratch.
RUN_DEFAULTS: dict[str, Any] = {
    "batch_size": 32, "grad_acc_steps": 1, "micro_acc_steps": 1, "loss_fn": "fvu", "optimizer": "signum",
    "lr": None, "lr_warmup_steps": 1000, "k_decay_steps": 0, "auxk_alpha": 0.0,
    "dead_feature_threshold": 10_000_000, "exclude_tokens": [], "hookpoints": [], "init_seeds": [0],
    "layers": [], "layer_stride": 1, "distribute_modules": False, "save_every": 1000, "save_best": False,
    "finetune": None, "log_to_wandb": True, "run_name": None, "wandb_log_frequency": 1,
    "save_dir": "checkpoints",
}


def _is_coder(path: Path) -> bool:
    if not ((path / CFG).exists() and (path / WEIGHTS).exists()):
        return False
    try:
        cfg = read_json(path / CFG)
    except SaeforgeError:
        return False
    return "arch" not in cfg and any(k in cfg for k in CODER_KEYS)


def hookpoints(path: Path) -> list[str]:
    """Hook-point sub-folders of a sparsify run folder."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _is_coder(p))


def detect(path: Path) -> bool:
    return path.is_dir() and (_is_coder(path) or bool(hookpoints(path)))


def resolve(path: Path, hookpoint: str | None) -> tuple[Path, str | None]:
    """The sparse-coder folder to read, and its hook point (None when unknown)."""
    if _is_coder(path):
        if hookpoint not in (None, path.name):
            raise SaeforgeError(f"{path} is a single sparse coder; drop hookpoint={hookpoint!r}")
        return path, (path.name if (path.parent / RUN_CFG).exists() else None)
    hps = hookpoints(path)
    if hookpoint is not None:
        if hookpoint not in hps:
            raise SaeforgeError(f"{path} has no hook point {hookpoint!r}; it has: {', '.join(hps) or 'none'}")
        return path / hookpoint, hookpoint
    if len(hps) == 1:
        return path / hps[0], hps[0]
    raise SaeforgeError(f"{path} is a sparsify run with several hook points ({', '.join(hps)}); pick one with "
                        "hookpoint= (--hookpoint)")


def load(path: Path, device: str | torch.device = "cpu", hookpoint: str | None = None, **_: Any) -> SAE:
    coder, hp = resolve(path, hookpoint)
    where = coder / CFG
    cfg = read_json(where)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise SaeforgeError(f"{where}: sparsify activation {act!r} has no saeforge equivalent (only topk)")
    for flag in ("embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise SaeforgeError(f"{where}: {flag}=true cannot be represented in saeforge (it needs inputs "
                                "other than this hook point's activations)")
    w = load_file(str(coder / WEIGHTS))
    for name in ("encoder.weight", "encoder.bias", "b_dec"):
        if name not in w:
            raise SaeforgeError(f"{coder / WEIGHTS}: tensor {name} is missing; is this a sparsify checkpoint?")
    if "W_dec" not in w:
        raise SaeforgeError(f"{coder / WEIGHTS}: the coder was saved without a decoder (decoder=False)")
    d_sae, d_in = w["encoder.weight"].shape
    if cfg.get("d_in") not in (None, d_in):
        raise SaeforgeError(f"{where}: d_in={cfg['d_in']} but encoder.weight is {list(w['encoder.weight'].shape)}")
    n_lat = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32))
    if n_lat != d_sae:
        raise SaeforgeError(f"{where}: num_latents/expansion_factor give {n_lat} latents but the weights "
                            f"hold {d_sae}")
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in w
    if bool(cfg.get("skip_connection", False)) != skip:
        raise SaeforgeError(f"{where}: skip_connection={cfg.get('skip_connection')} but W_skip is "
                            f"{'present' if skip else 'missing'}")
    extra = sorted(set(w) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"})
    if extra:
        raise SaeforgeError(f"{coder / WEIGHTS}: tensors {extra} have no meaning for a sparsify coder")
    t = {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if skip:
        t["W_skip"] = w["W_skip"]
    hook, target = (hp, None) if not transcode or hp is None else (f"{hp}:in", hp)
    run = read_json(coder.parent / RUN_CFG) if (coder.parent / RUN_CFG).exists() else None
    md = source_metadata(SPARSIFY, "sparsify", None, coder, {"coder": cfg, "run": run},
                         sparsify_hookpoint=hp, sparsify_transcode=transcode)
    return build_sae(
        "topk", t, device, where=str(coder), d_in=d_in, d_sae=d_sae, d_out=int(w["W_dec"].shape[1]),
        hook=hook, target_hook=target, apply_b_dec_to_input=not transcode, skip=skip, k=int(cfg["k"]),
        multi_topk=bool(cfg.get("multi_topk", False)), metadata=md,
    )


def save(sae: SAE, path: Path, hookpoint: str | None = None, **_: Any) -> Path:
    """Write one sparse coder into ``path`` (what ``SparseCoder.load_from_disk(path)`` reads) or, with
    ``hookpoint``, a run folder ``path/<hookpoint>/`` plus the run-level ``config.json``."""
    cfg = sae.cfg
    spec = spec_of(sae, SPARSIFY)
    require(spec.activation == "topk", SPARSIFY, cfg.arch, "sparsify coders are top-k only", "use --to saelens")
    require_plain_input(sae, SPARSIFY)
    require(cfg.d_out == cfg.d_in, SPARSIFY, cfg.arch,
            f"sparsify transcoders map d_in -> d_in (this one maps {cfg.d_in} -> {cfg.d_out})")
    md = cfg.metadata or {}
    src = (md.get("source_config") or {}) if md.get("source_format") == SPARSIFY else {}
    src_coder, src_run = src.get("coder") or {}, src.get("run")
    transcode = cfg.is_transcoder or bool(src_coder.get("transcode", False))
    ex = export_tensors(sae, SPARSIFY, subtract_b_dec=not transcode)
    t = ex.tensors
    out = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
           "b_dec": t["b_dec"]}
    if cfg.skip:
        out["W_skip"] = t["W_skip"]
    coder_cfg = {
        "activation": "topk",
        "expansion_factor": src_coder.get("expansion_factor", max(cfg.d_sae // cfg.d_in, 1)),
        "normalize_decoder": src_coder.get("normalize_decoder", True),
        "num_latents": cfg.d_sae, "k": spec.k, "multi_topk": bool(spec.details.get("multi_topk", False)),
        "skip_connection": bool(cfg.skip), "transcode": transcode,
    }
    folder = path if hookpoint is None else path / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(folder / WEIGHTS, out)
    write_json_atomic(folder / CFG, {**coder_cfg, "d_in": cfg.d_in})
    if hookpoint is not None:
        run = dict(src_run) if src_run else {"sae": None, **RUN_DEFAULTS}
        run["sae"] = coder_cfg
        run["hookpoints"] = [hookpoint]
        write_json_atomic(path / RUN_CFG, run)
    return path
