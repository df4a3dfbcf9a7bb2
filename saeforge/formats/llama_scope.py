"""Llama Scope checkpoints (fnlp/Llama3_1-8B-Base-L*; He et al. 2024, arXiv:2410.20526), read only.

A folder ``Llama3_1-8B-Base-L{layer}{site}-{8|32}x`` holds ``hyperparams.json`` and
``checkpoints/final.safetensors`` with ``encoder.weight [d_sae, d]``, ``encoder.bias``, ``decoder.weight [d,
d_sae]``, ``decoder.bias``. The SAEs are JumpReLUs with one scalar ``jump_relu_threshold``, trained on inputs
scaled by ``s = √d / dataset_average_activation_norm["in"]`` and reconstructing in that scaled space (undone with
``s_out`` from ``["out"]``). saeforge reads them exactly as SAELens's ``llama_scope_sae_huggingface_loader`` plus
its activation-norm folding (``fold_activation_norm_scaling_factor``) does:

    h = (s·x) W_enc + b_enc,   f = h · 1[h > θ·s],   x̂ = (f W_dec + b_dec) / s_out

(``cfg.input_scale = s``, ``cfg.output_scale = s_out``, per-latent thresholds θ·s as SAELens scales them, no
``b_dec`` subtraction); tests/test_llama_scope.py checks this against SAELens's loader where it is installed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saeforge.errors import SaeforgeError
from saeforge.formats.common import build_sae, log_threshold, read_json, source_metadata
from saeforge.hooknames import to_saeforge
from saeforge.sae import SAE

LLAMA_SCOPE = "llama_scope"
CONFIG = "hyperparams.json"
WEIGHTS = "checkpoints/final.safetensors"
FILES = (WEIGHTS, CONFIG)  # what a release download fetches (the folder is the config's)


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).exists() and (path / WEIGHTS).exists()


def load(path: Path, device: str | torch.device = "cpu", **_: Any) -> SAE:
    cfg = read_json(path / CONFIG)
    try:
        d_in, d_sae = int(cfg["d_model"]), int(cfg["d_sae"])
        norms = cfg["dataset_average_activation_norm"]
        norm_in = float(norms["in"])
        norm_out = float(norms.get("out", norm_in))
        theta = float(cfg["jump_relu_threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise SaeforgeError(f"{path / CONFIG}: not a Llama Scope hyperparams.json (no usable {e}); re-download "
                            "it or pass --from with the right format") from None
    if not all(v > 0 and math.isfinite(v) for v in (norm_in, norm_out)):
        raise SaeforgeError(f"{path / CONFIG}: dataset_average_activation_norm {norms} must be positive")
    w = load_file(str(path / WEIGHTS))
    scale = math.sqrt(d_in) / norm_in
    t = {"W_enc": w["encoder.weight"].float().T.contiguous(), "b_enc": w["encoder.bias"].float(),
         "W_dec": w["decoder.weight"].float().T.contiguous(), "b_dec": w["decoder.bias"].float()}
    # SAELens: θ_config · s, in float32 as its loader computes it
    thr = torch.full((d_sae,), theta, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
    t["log_threshold"] = log_threshold(thr, str(path / CONFIG))
    md = source_metadata(LLAMA_SCOPE, "llama_scope", None, path, config=cfg, llama_scope_input_scale=scale)
    hook = cfg.get("hook_point_in")
    return build_sae("jumprelu", t, device, where=str(path), d_in=d_in, d_sae=d_sae, d_out=int(t["W_dec"].shape[1]),
                     apply_b_dec_to_input=False, input_scale=scale, output_scale=math.sqrt(d_in) / norm_out,
                     metadata=md,
                     hook=to_saeforge(hook) if isinstance(hook, str) else None)


def save(sae: SAE, path: Path, **_: Any) -> Path:
    raise SaeforgeError("Llama Scope is a read-only format in saeforge; write the SAE with --to saelens or saeforge")
