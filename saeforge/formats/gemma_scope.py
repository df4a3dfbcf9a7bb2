"""Gemma Scope ``params.npz`` (google/gemma-scope-*): JumpReLU SAEs as plain numpy arrays, no config file.

Keys ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]`` (rows = latents), ``b_enc``, ``b_dec``, ``threshold
[d_sae]``; ``h = x @ W_enc + b_enc`` (**no** ``b_dec`` subtraction), ``f = relu(h) · 1[h > threshold]``,
``x̂ = f @ W_dec + b_dec``. Like sae_lens's ``gemma_2`` loader: ``w_*`` keys are renamed ``W_*`` and an all-ones
``scaling_factor`` is dropped. Dimensions come from the array shapes.

*Embedding* SAEs (Gemma Scope's ``embedding/width_*/average_l0_*`` folders) were trained on the embedding
scaled by √d_model, and sae_lens's ``gemma_2`` loader adapts them to the unscaled ``hook_embed`` by loading
``W_enc / √d_in`` and ``W_dec · √d_in`` (b_enc, b_dec and the thresholds unchanged), deciding from the folder
name (``"embedding" in folder_name``). saeforge does the same, from the file's folder path:
:func:`is_embedding` (``embedding=True/False`` overrides it), and records ``gemma_scope_embedding_scale`` in the
metadata. The writer applies the inverse when the destination folder is an embedding folder, so that a file it
writes there reads back (here and in sae_lens) as the SAE it was given.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    GEMMA_SCOPE,
    build_sae,
    export_tensors,
    log_threshold,
    per_latent_threshold,
    require,
    require_plain_input,
    source_metadata,
    spec_of,
)
from saeforge.io import atomic_open
from saeforge.sae import SAE

FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def detect(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".npz") or (path.is_dir() and (path / FILE).exists())


def is_embedding(file: Path) -> bool:
    """True for an embedding SAE's file: a folder holding it (up to three levels, Gemma Scope's
    ``<site>/<width>/<l0>``) is named with ``embedding``, as sae_lens tests on the Hub sub-folder name. Symlinks
    are not followed: in the Hugging Face cache the file links to ``blobs/<hash>``, the folder names are where
    it is linked from."""
    return any("embedding" in part for part in Path(os.path.abspath(file)).parent.parts[-3:])


def load(path: Path, device: str | torch.device = "cpu", embedding: bool | None = None, **_: Any) -> SAE:
    file = path / FILE if path.is_dir() else path
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {(("W_" + k[2:]) if k.startswith("w_") else k): np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as err:
        raise SaeforgeError(f"{file} is not a readable .npz archive ({err})") from None
    if "scaling_factor" in arrays:
        if not np.all(arrays["scaling_factor"] == 1):
            raise SaeforgeError(f"{file}: a scaling_factor other than 1 cannot be represented; fold it first")
        del arrays["scaling_factor"]
    missing = [k for k in KEYS if k not in arrays]
    extra = sorted(set(arrays) - set(KEYS))
    if missing or extra:
        raise SaeforgeError(f"{file}: a Gemma Scope JumpReLU needs exactly {list(KEYS)} (missing {missing}, "
                            f"unexpected {extra})")
    t = {k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in KEYS}
    t["log_threshold"] = log_threshold(t.pop("threshold"), str(file))
    d_in, d_sae = t["W_enc"].shape
    extra: dict[str, Any] = {}
    if is_embedding(file) if embedding is None else embedding:
        scale = np.sqrt(d_in)  # the same float32 operations as sae_lens's loader
        t["W_enc"], t["W_dec"] = t["W_enc"] / scale, t["W_dec"] * scale
        extra["gemma_scope_embedding_scale"] = float(scale)
    md = source_metadata(GEMMA_SCOPE, "gemma_scope", None, file, **extra)
    return build_sae("jumprelu", t, device, where=str(file), d_in=int(d_in), d_sae=int(d_sae),
                     d_out=int(t["W_dec"].shape[1]), apply_b_dec_to_input=False, metadata=md)


def save(sae: SAE, path: Path, embedding: bool | None = None, **_: Any) -> Path:
    """Write ``path`` (if it ends in .npz) or ``path/params.npz`` with ``np.savez`` (uncompressed), float32.

    Into an embedding folder (:func:`is_embedding`, or ``embedding=True``) the weights are written as Gemma
    Scope stores them (``W_enc · √d_in``, ``W_dec / √d_in``), so the loaders' rescaling gives this SAE back."""
    cfg = sae.cfg
    require(spec_of(sae, GEMMA_SCOPE).activation in ("jumprelu", "batchtopk"), GEMMA_SCOPE, cfg.arch,
            "Gemma Scope files hold JumpReLU SAEs", "use --to saelens or saeforge")
    require(not cfg.skip, GEMMA_SCOPE, cfg.arch, "params.npz has no skip connection (W_skip)")
    require_plain_input(sae, GEMMA_SCOPE)
    ex = export_tensors(sae, GEMMA_SCOPE, subtract_b_dec=False)
    t = ex.tensors
    arrays = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
              "threshold": per_latent_threshold(ex)}
    file = path if path.suffix == ".npz" else path / FILE
    if is_embedding(file) if embedding is None else embedding:
        scale = math.sqrt(cfg.d_in)
        arrays["W_enc"], arrays["W_dec"] = arrays["W_enc"].double() * scale, arrays["W_dec"].double() / scale
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(file, "wb") as fh:
        np.savez(fh, **{k: v.detach().cpu().float().contiguous().numpy() for k, v in arrays.items()})
    return file
