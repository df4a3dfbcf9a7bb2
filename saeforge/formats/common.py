"""Helpers every format module shares: safe file reading, building a saeforge SAE from foreign tensors, and
exporting a saeforge SAE's tensors in the convention a foreign format expects.

The formats differ in a few conventions that are all exact linear-algebra identities away from each other
(see docs/formats.md), so the reader/writer for each format only renames and transposes tensors, and the two
functions here do the arithmetic:

* ``build_sae`` -- foreign tensors (already in saeforge orientation) -> a saeforge :class:`SAE`;
* ``export_tensors`` -- a saeforge SAE -> its tensors with dataset-level scales folded in and the
  "subtract ``b_dec`` before encoding" convention switched to what the target needs.

Switching the ``b_dec`` convention uses ``(x - b) @ W + c == x @ W + (c - b @ W)``; folding a scalar input
scale ``s`` uses ``(s·x) @ W == x @ (s·W)`` (the same fold SAELens applies to ``expected_average_only_in``:
``W_enc *= s; W_dec /= s; b_dec /= s``). The arithmetic runs in float64 and is only done when needed, so a
checkpoint written back to its own format keeps bit-identical tensors.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.sae import SAE, create_sae, get_arch, make_config
from saeforge.sae.base import ExportSpec

# Canonical format names (the keys of saeforge.formats.FORMATS).
SAEFORGE, SAELENS, SPARSIFY, DICTIONARY_LEARNING, GEMMA_SCOPE, OPENAI = (
    "saeforge", "saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai",
)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise SaeforgeError(f"{path} does not exist; point at the folder that holds the checkpoint") from None
    except json.JSONDecodeError as err:
        raise SaeforgeError(f"{path} is not valid JSON ({err}); re-export the checkpoint") from None
    if not isinstance(obj, dict):
        raise SaeforgeError(f"{path} holds a JSON {type(obj).__name__}, not an object; re-export the checkpoint")
    return obj


def torch_load_dict(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: never unpickle arbitrary objects from a downloaded file.

    The restricted unpickler accepts tensors, dicts (OrderedDict too), strings and numbers, which is all
    dictionary_learning's ``ae.pt`` and OpenAI's state dicts (with their ``"activation": "TopK"`` string and
    ``activation_state_dict`` OrderedDict) contain.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SaeforgeError(f"{path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SaeforgeError(
            f"{path} cannot be read with torch.load(weights_only=True) ({first}); re-save it as a plain dict "
            "of tensors"
        ) from None
    if not isinstance(obj, dict):
        raise SaeforgeError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    return obj


# log θ for a JumpReLU threshold θ <= 0: exp(-1000) is exactly 0.0 in float16/bfloat16/float32/float64, so the
# latent computes relu(h) · 1[h > 0] = relu(h), which is what every reader (SAELens, Gemma Scope,
# dictionary_learning: relu(h) · 1[h > θ]) computes for θ <= 0; finite, so saving, resuming and fine-tuning
# (whose threshold gradient is then 0) accept it
RELU_LOG_THRESHOLD = -1000.0


def log_threshold(threshold: Tensor, where: str) -> Tensor:
    """JumpReLU thresholds -> saeforge's ``log_threshold`` parameter (computed in float64).

    A threshold <= 0 (SAELens's own training writes them) makes the latent exactly a ReLU, since the readers
    compute ``relu(h) · 1[h > θ]``; it becomes :data:`RELU_LOG_THRESHOLD` (θ = 0 on export). NaN is refused.
    """
    threshold = threshold.detach().double().reshape(-1)
    bad = int(torch.isnan(threshold).sum())
    if bad:
        raise SaeforgeError(
            f"{where}: {bad} of {threshold.numel()} latents have a NaN JumpReLU threshold; the file is damaged "
            "(re-download or re-train it)"
        )
    out = threshold.clamp_min(torch.finfo(torch.float64).tiny).log()
    return torch.where(threshold > 0, out, torch.full_like(out, RELU_LOG_THRESHOLD)).float()


def threshold_from_log(log_thr: Tensor) -> Tensor:
    return log_thr.detach().double().exp().float()


def source_metadata(fmt: str, library: str, version: str | None, path: Path | str, config: Any = None,
                    **extra: Any) -> dict[str, Any]:
    """Provenance recorded in ``cfg.metadata``; ``source_config`` lets a writer of the same format restore
    fields saeforge does not model (trainer hyper-parameters, run settings)."""
    meta: dict[str, Any] = {
        "source_format": fmt,
        "source_library": library,
        "source_version": version,
        "source_path": str(path),
    }
    if config is not None:
        meta["source_config"] = config
    meta.update(extra)
    return meta


_NO_DATA_INIT = {"scale_inputs": False, "init_b_dec_geometric_median": False}


def build_sae(arch: str, tensors: dict[str, Tensor], device: str | torch.device = "cpu", where: str = "",
              **cfg_kw: Any) -> SAE:
    """A saeforge SAE of ``arch`` holding ``tensors`` (saeforge names and orientation).

    Parameters and buffers the file does not set keep the architecture's initial values, so an architecture
    that gains a training-only buffer still loads foreign checkpoints. Data-dependent initialisation
    (dataset input scaling, geometric-median ``b_dec``) is switched off, so fine-tuning a loaded SAE starts
    from its weights; a loaded JumpReLU gets the ``gemmascope`` recipe (threshold-only pseudo-gradients, the
    recipe Gemma Scope, SAELens and dictionary_learning train with), whose data init leaves ``b_enc`` alone.
    """
    cls = get_arch(arch)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    for name, value in _NO_DATA_INIT.items():  # keep loaded weights if a trainer calls init_from_data
        if name in fields:
            cfg_kw.setdefault(name, value)
    for name, value in cls.IMPORT_DEFAULTS.items():  # e.g. JumpReLU's threshold-only recipe
        cfg_kw.setdefault(name, value)
    cfg = make_config(arch, **cfg_kw)
    sae = create_sae(cfg)
    state = sae.state_dict()
    for name, value in tensors.items():
        if name not in state:
            raise SaeforgeError(f"{where}: saeforge arch {arch!r} has no tensor {name!r}; this is a reader bug")
        want = tuple(state[name].shape)
        if tuple(value.shape) != want:
            raise SaeforgeError(
                f"{where}: tensor {name} has shape {list(value.shape)} but d_in={cfg.d_in}, d_sae={cfg.d_sae}, "
                f"d_out={cfg.d_out} need {list(want)}; the checkpoint's config and weights disagree"
            )
        state[name] = value.detach().to(dtype=state[name].dtype).contiguous()
    sae.load_state_dict(state)
    sae.eval()
    return sae.to(device)


def fold_decoder_norms(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Move each decoder row's norm into the encoder: ``W_enc[:, j] *= n_j``, ``b_enc[j] *= n_j``,
    ``W_dec[j] /= n_j`` (SAELens ``fold_W_dec_norm``; dictionary_learning ``normalize_decoder``).

    Codes scale by ``n_j`` and reconstructions are unchanged. Rows of norm 0 stay 0.
    """
    n = W_dec.double().norm(dim=1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return ((W_enc.double() * n).float(), (b_enc.double() * n).float(),
            (W_dec.double() / safe[:, None]).float())


@dataclass
class Exported:
    """A saeforge SAE's tensors in the convention one foreign format needs (float32, CPU, saeforge names
    and orientation; ``threshold`` replaces ``log_threshold``), with the SAE's :class:`ExportSpec`."""

    arch: str
    cfg: Any
    tensors: dict[str, Tensor]
    subtract_b_dec: bool
    spec: ExportSpec


def spec_of(sae: SAE, fmt: str) -> ExportSpec:
    """The SAE's declared :class:`ExportSpec`; an architecture that declares none cannot be written to ``fmt``."""
    spec = sae.export_spec()
    if spec is None:
        raise SaeforgeError(f"format {fmt} cannot hold a {sae.cfg.arch} SAE (the architecture declares no export); "
                            "save it with --to saeforge")
    return spec


def _encoder_biases(spec: ExportSpec, t: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """(bias name, the encoder matrix it pairs with) for every pre-activation the SAE computes."""
    return [(bias, t["W_enc"] if scale is None else t["W_enc"] * t[scale].exp()) for bias, scale in spec.encoder_biases]


def export_tensors(sae: SAE, fmt: str, subtract_b_dec: bool | None) -> Exported:
    """The SAE's tensors with ``input_scale``/``output_scale`` folded in and the ``b_dec`` subtraction
    switched to ``subtract_b_dec`` (``None``: keep the SAE's own ``apply_b_dec_to_input``).

    Decoder norms are *not* folded (``sae.folded()`` is not applied): a conversion keeps every code value,
    so feature activations match the source library's. Call ``sae.folded()`` first for unit decoder rows.
    """
    cfg = sae.cfg
    arch = cfg.arch
    spec = spec_of(sae, fmt)
    state = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    t = {k: state[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip") if k in state}
    t.update({k: v.float() for k, v in spec.tensors.items()})
    have = bool(cfg.apply_b_dec_to_input)
    want = have if subtract_b_dec is None else bool(subtract_b_dec)
    s_in, s_out = float(cfg.input_scale), float(cfg.output_scale)
    if want and cfg.d_out != cfg.d_in:
        raise SaeforgeError(
            f"format {fmt} subtracts b_dec from the input before encoding, which needs d_out == d_in "
            f"(this {arch} SAE maps {cfg.d_in} -> {cfg.d_out}); choose a format that holds transcoders"
        )
    if have == want and s_in == s_out == 1.0:
        return Exported(arch, cfg, t, want, spec)
    d = {k: v.double() for k, v in t.items() if k != "threshold"}
    if have == want and s_in == s_out:
        # (s·x − b) @ W = (x − b/s) @ (s·W): SAELens's fold_activation_norm_scaling_factor.
        d["W_enc"] = d["W_enc"] * s_in
        d["W_dec"], d["b_dec"] = d["W_dec"] / s_out, d["b_dec"] / s_out
    else:
        if have:  # h = (s·x − b) @ W + c  ->  x @ (s·W) + (c − b @ W)
            for name, W in _encoder_biases(spec, d):
                d[name] = d[name] - d["b_dec"] @ W
        d["W_enc"] = d["W_enc"] * s_in
        d["W_dec"], d["b_dec"] = d["W_dec"] / s_out, d["b_dec"] / s_out
        if want:  # x @ W + c'  ->  (x − b) @ W + (c' + b @ W)
            for name, W in _encoder_biases(spec, d):
                d[name] = d[name] + d["b_dec"] @ W
    out = {k: v.float() for k, v in d.items()}
    if "threshold" in t:
        out["threshold"] = t["threshold"]
    return Exported(arch, cfg, out, want, spec)


def per_latent_threshold(ex: Exported) -> Tensor:
    """The JumpReLU threshold ``[d_sae]``: a BatchTopK's one global threshold broadcast over the latents."""
    thr = ex.tensors["threshold"]
    return thr.expand(ex.cfg.d_sae).clone() if thr.dim() == 0 else thr


def require(ok: bool, fmt: str, arch: str, why: str, fix: str = "") -> None:
    """Raise the one-line "format cannot hold this" error when ``ok`` is false."""
    if not ok:
        tail = f"; {fix}" if fix else ""
        raise SaeforgeError(f"format {fmt} cannot hold this {arch} SAE: {why}{tail}")


def require_plain_input(sae: SAE, fmt: str) -> None:
    require(sae.cfg.input_norm == "none", fmt, sae.cfg.arch,
            f"it has no run-time input normalisation (this SAE uses input_norm={sae.cfg.input_norm!r})",
            "use --to saelens or saeforge")


def first_int(text: str | None) -> int | None:
    """The first integer in a hook name ('blocks.3.hook_resid_post' -> 3), for formats that record a layer."""
    m = re.search(r"(\d+)", text or "")
    return int(m.group(1)) if m else None

