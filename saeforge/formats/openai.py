"""OpenAI ``sparse_autoencoder`` state dicts (github.com/openai/sparse_autoencoder, ``model.py`` at 4965b94).

``torch.save(Autoencoder.state_dict())``: ``pre_bias [d_in]``, ``encoder.weight [d_sae, d_in]`` (nn.Linear, no
bias), ``latent_bias [d_sae]``, ``decoder.weight [d_in, d_sae]`` (nn.Linear: **columns** are latents; absent when
the decoder is tied to the encoder), three statistics buffers, and the non-tensor entries ``"activation"``
(``"TopK"`` or ``"ReLU"``) and ``"activation_state_dict"`` (``{"k": 8, "postact_fn": "ReLU"}``).

``normalize`` is not stored: ``Autoencoder.from_state_dict`` sets it to ``activation == "TopK"``, i.e. TopK
autoencoders layer-normalise their input (unbiased std, eps 1e-5 on the std) and undo it after decoding, and
``pre_bias`` is subtracted after the layer norm -- saeforge's ``input_norm="layer_norm"`` with
``apply_b_dec_to_input``. The statistics buffers are training bookkeeping and are dropped; the
``activation.k``/``activation.postact_fn`` keys that ``Autoencoder.state_dict()`` itself emits are ignored.
The file holds an OrderedDict and strings, which ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    OPENAI,
    build_sae,
    export_tensors,
    first_int,
    require,
    source_metadata,
    spec_of,
    torch_load_dict,
)
from saeforge.io import atomic_open
from saeforge.sae import SAE

STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
IGNORED = ("activation", "activation_state_dict", "activation.k", "activation.postact_fn", *STATS)


def pt_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".pt") if path.is_dir() else []


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".pt" and path.name != "ae.pt"
    return len(pt_files(path)) == 1 and not (path / "ae.pt").exists()


def resolve(path: Path) -> Path:
    if path.is_file():
        return path
    files = pt_files(path)
    if len(files) != 1:
        names = ", ".join(p.name for p in files) or "none"
        raise SaeforgeError(f"{path} should hold one OpenAI .pt file (found: {names}); pass the file itself")
    return files[0]


def load(path: Path, device: str | torch.device = "cpu", **_: Any) -> SAE:
    file = resolve(path)
    sd = torch_load_dict(file)
    missing = [k for k in ("pre_bias", "encoder.weight", "latent_bias") if k not in sd]
    if missing:
        raise SaeforgeError(f"{file}: entries {missing} are missing; is this an OpenAI sparse_autoencoder file?")
    extra = sorted(set(sd) - set(IGNORED) - {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"})
    if extra:
        raise SaeforgeError(f"{file}: entries {extra} have no meaning for an OpenAI Autoencoder")
    act = sd.get("activation", "ReLU")
    act_sd = dict(sd.get("activation_state_dict") or {})
    enc = sd["encoder.weight"]
    # Tied decoder (TiedTranspose): decode uses encoder.weight's rows as the latent directions.
    W_dec = sd["decoder.weight"].T if "decoder.weight" in sd else enc
    t = {"W_enc": enc.T, "b_enc": sd["latent_bias"], "W_dec": W_dec, "b_dec": sd["pre_bias"]}
    d_sae, d_in = enc.shape
    md = source_metadata(OPENAI, "openai/sparse_autoencoder", None, file, {"activation": act,
                         "activation_state_dict": act_sd}, tied_decoder="decoder.weight" not in sd)
    common = dict(d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=True, metadata=md)
    if act == "TopK":
        k = act_sd.get("k", sd.get("activation.k"))
        post = act_sd.get("postact_fn", sd.get("activation.postact_fn", "ReLU"))
        if post != "ReLU":
            raise SaeforgeError(f"{file}: TopK with postact_fn={post!r} keeps negative values, which saeforge's "
                                "top-k (ReLU on the kept values) cannot represent")
        if k is None:
            raise SaeforgeError(f"{file}: activation TopK without activation_state_dict['k']")
        return build_sae("topk", t, device, where=str(file), k=int(k), input_norm="layer_norm", **common)
    if act == "ReLU":
        return build_sae("relu", t, device, where=str(file), **common)
    raise SaeforgeError(f"{file}: OpenAI activation {act!r} has no saeforge equivalent (TopK, ReLU)")


def save(sae: SAE, path: Path, **_: Any) -> Path:
    """Write ``path`` (if it ends in .pt) or ``path/<layer>.pt`` as ``Autoencoder.from_state_dict`` reads it."""
    cfg = sae.cfg
    require(not cfg.skip and not cfg.is_transcoder, OPENAI, cfg.arch, "OpenAI autoencoders have no transcoders")
    spec = spec_of(sae, OPENAI)
    if spec.activation == "topk":
        require(cfg.input_norm == "layer_norm", OPENAI, cfg.arch,
                "OpenAI TopK autoencoders always layer-normalise their input (input_norm must be layer_norm)",
                "use --to saelens or sparsify")
        act, act_sd = "TopK", OrderedDict([("k", int(spec.k)), ("postact_fn", "ReLU")])
    elif spec.activation == "relu":
        require(cfg.input_norm == "none", OPENAI, cfg.arch,
                "OpenAI ReLU autoencoders never normalise their input (input_norm must be none)")
        act, act_sd = "ReLU", OrderedDict()
    else:
        raise SaeforgeError(f"format {OPENAI} cannot hold a {cfg.arch} SAE (it holds topk with layer_norm inputs "
                            "and relu)")
    t = export_tensors(sae, OPENAI, subtract_b_dec=True).tensors
    n = cfg.d_sae
    sd: dict[str, Any] = OrderedDict([
        ("pre_bias", t["b_dec"]),
        ("latent_bias", t["b_enc"]),
        ("stats_last_nonzero", torch.zeros(n, dtype=torch.long)),  # model.py's initial buffer values
        ("latents_activation_frequency", torch.ones(n, dtype=torch.float)),
        ("latents_mean_square", torch.zeros(n, dtype=torch.float)),
        ("encoder.weight", t["W_enc"].T.contiguous()),
        ("decoder.weight", t["W_dec"].T.contiguous()),
        ("activation", act),
        ("activation_state_dict", act_sd),
    ])
    file = path if path.suffix == ".pt" else path / f"{first_int(cfg.hook) or 0}.pt"
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(file, "wb") as fh:
        torch.save(sd, fh)
    return file
