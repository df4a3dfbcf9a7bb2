"""dictionary_learning (saprmarks/dictionary_learning 0.1.0) checkpoints: ``ae.pt`` + ``config.json``.

``trainSAE(save_dir=...)`` writes ``<save_dir>/trainer_<i>/{ae.pt, config.json}``; ``config.json`` is
``{"trainer": trainer.config, "buffer": buffer.config}`` and ``trainer.dict_class`` names the class.
``ae.pt`` is a plain ``torch.save`` of the state dict. Per class (the saeforge architecture in brackets):

* ``AutoEncoder`` [relu]: ``encoder.weight [d_sae, d_in]``/``encoder.bias`` (nn.Linear), ``decoder.weight
  [d_in, d_sae]`` (nn.Linear: **columns** are latents), ``bias`` subtracted before encoding and added after.
  Loaded **as stored**; ``load_dictionary`` instead calls ``from_pretrained(normalize_decoder=True)``, which
  unit-normalises decoder columns and scales encoder rows/bias by the norms (same reconstruction, codes
  scaled by the norms) -- ``normalize_decoder=True`` reproduces that.
* ``AutoEncoderTopK`` [topk] and ``BatchTopKSAE`` [batchtopk]: ``encoder.*``, ``decoder.weight``, ``b_dec``,
  ``k`` (int32 scalar), ``threshold`` (float32 scalar). BatchTopK's inference is ``p · 1[p > threshold]`` with
  ``p = relu(pre)`` and one global threshold; AutoEncoderTopK's default encode ignores its threshold, which
  is kept in ``metadata`` so a write-back restores it.
* ``JumpReluAutoEncoder`` [jumprelu]: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``,
  ``threshold [d_sae]``; **no** ``b_dec`` subtraction. ``trainSAE(normalize_activations=True)`` rescales the
  saved biases to raw activations and does not record the factor, so nothing is rescaled here.
* ``GatedAutoEncoder`` [gated]: ``encoder.weight`` (no bias), ``decoder.weight``, ``decoder_bias``,
  ``gate_bias``, ``mag_bias``, ``r_mag``.
* ``MatryoshkaBatchTopKSAE`` [matryoshka]: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]`` (rows,
  not nn.Linear), ``b_dec`` (subtracted before encoding), ``k`` (int32), ``threshold`` (float32 scalar: the
  BatchTopK inference rule), ``group_sizes`` (int64 ``[n_groups]``); ``config.json`` adds ``group_fractions``,
  ``group_weights`` and ``group_sizes``.

The writer picks the class from the SAE's declared :class:`~saeforge.sae.base.ExportSpec` (its activation, and
nested groups), never from the architecture name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.formats.common import (
    DICTIONARY_LEARNING,
    build_sae,
    export_tensors,
    first_int,
    fold_decoder_norms,
    log_threshold,
    read_json,
    require,
    require_plain_input,
    source_metadata,
    spec_of,
    torch_load_dict,
)
from saeforge.io import atomic_open, write_json_atomic
from saeforge.sae import SAE
from saeforge.sae.base import ExportSpec

AE, CFG = "ae.pt", "config.json"
CLASSES = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
           "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated", "MatryoshkaBatchTopKSAE": "matryoshka"}
# ExportSpec activation -> class (a "batchtopk" with nested groups is a MatryoshkaBatchTopKSAE)
DICT_CLASS = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
              "jumprelu": "JumpReluAutoEncoder", "gated": "GatedAutoEncoder"}
MATRYOSHKA = "MatryoshkaBatchTopKSAE"
TRAINER = {"AutoEncoder": "StandardTrainer", "AutoEncoderTopK": "TopKTrainer", "BatchTopKSAE": "BatchTopKTrainer",
           "JumpReluAutoEncoder": "JumpReluTrainer", "GatedAutoEncoder": "GatedSAETrainer",
           MATRYOSHKA: "MatryoshkaBatchTopKTrainer"}
# The keys each trainer's .config writes (dictionary_learning 0.1.0), for a config.json written from scratch.
_TAIL = ["seed", "activation_dim", "dict_size", "device", "layer", "lm_name", "wandb_name", "submodule_name"]
_TOPK = ["trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start",
         "threshold_beta", "threshold_start_step"]
_L1 = ["dict_class", "trainer_class", "activation_dim", "dict_size", "lr", "l1_penalty", "warmup_steps"]
_L1_TAIL = ["seed", "device", "layer", "lm_name", "wandb_name", "submodule_name"]
TRAINER_KEYS = {
    "AutoEncoder": [*_L1, "resample_steps", "sparsity_warmup_steps", "steps", "decay_start", *_L1_TAIL],
    "AutoEncoderTopK": [*_TOPK, "seed", "activation_dim", "dict_size", "k", "device", "layer", "lm_name",
                        "wandb_name", "submodule_name"],
    "BatchTopKSAE": [*_TOPK, "top_k_aux", "seed", "activation_dim", "dict_size", "k", "device", "layer",
                     "lm_name", "wandb_name", "submodule_name"],
    "JumpReluAutoEncoder": ["trainer_class", "dict_class", "lr", "steps", *_TAIL, "bandwidth",
                            "sparsity_penalty", "sparsity_warmup_steps", "target_l0"],
    "GatedAutoEncoder": [*_L1, "sparsity_warmup_steps", "decay_start", *_L1_TAIL],
    MATRYOSHKA: [*_TOPK, "top_k_aux", "seed", "activation_dim", "dict_size", "group_fractions", "group_weights",
                 "group_sizes", "k", "device", "layer", "lm_name", "wandb_name", "submodule_name"],
}
BUFFER_KEYS = ["d_submodule", "io", "n_ctxs", "ctx_len", "refresh_batch_size", "out_batch_size", "device"]
TOPK_INIT_THRESHOLD = -1.0  # AutoEncoderTopK/BatchTopKSAE register threshold = -1 before training sets it


def _is_trainer(path: Path) -> bool:
    return (path / AE).exists() and (path / CFG).exists()


def trainers(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _is_trainer(p))


def detect(path: Path) -> bool:
    return path.is_dir() and (_is_trainer(path) or bool(trainers(path)))


def resolve(path: Path) -> Path:
    if _is_trainer(path):
        return path
    found = trainers(path)
    if len(found) == 1:
        return path / found[0]
    raise SaeforgeError(f"{path} holds several dictionary_learning trainers ({', '.join(found)}); pass "
                        "subfolder= (--subfolder) to pick one")


def _take(sd: dict[str, Any], names: list[str], where: Path) -> list[Tensor]:
    missing = [n for n in names if n not in sd]
    if missing:
        raise SaeforgeError(f"{where}: tensors {missing} are missing for this dict_class")
    return [sd[n] for n in names]


def load(path: Path, device: str | torch.device = "cpu", normalize_decoder: bool = False, **_: Any) -> SAE:
    path = resolve(path)
    conf = read_json(path / CFG)
    tr = conf.get("trainer") or {}
    dict_class = tr.get("dict_class")
    if dict_class not in CLASSES:
        raise SaeforgeError(f"{path / CFG}: dict_class {dict_class!r} has no saeforge equivalent; supported: "
                            f"{', '.join(CLASSES)}")
    arch = CLASSES[dict_class]
    where = path / AE
    sd = torch_load_dict(where)
    t: dict[str, Tensor] = {}
    kw: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    if dict_class == "AutoEncoder":
        enc, enc_b, dec, bias = _take(sd, ["encoder.weight", "encoder.bias", "decoder.weight", "bias"], where)
        t = {"W_enc": enc.T, "b_enc": enc_b, "W_dec": dec.T, "b_dec": bias}
        if normalize_decoder:  # AutoEncoder.from_pretrained(normalize_decoder=True), as load_dictionary does
            t["W_enc"], t["b_enc"], t["W_dec"] = fold_decoder_norms(t["W_enc"], t["b_enc"], t["W_dec"])
        used = {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        names = ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"]
        enc, enc_b, dec, b_dec, k, thr = _take(sd, names, where)
        t = {"W_enc": enc.T, "b_enc": enc_b, "W_dec": dec.T, "b_dec": b_dec}
        kw["k"] = int(k)
        if tr.get("k") is not None and int(tr["k"]) != int(k):
            raise SaeforgeError(f"{path}: k is {int(k)} in ae.pt but {tr['k']} in config.json")
        if dict_class == "BatchTopKSAE":
            t["threshold"] = thr.reshape(())
        else:
            extras["dictionary_learning_threshold"] = float(thr)
        used = set(names)
    elif dict_class == MATRYOSHKA:
        names = ["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"]
        W_enc, b_enc, W_dec, b_dec, k, thr, sizes = _take(sd, names, where)
        t = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr.reshape(())}
        kw.update(_matryoshka_config(tr, int(k), [int(s) for s in sizes.reshape(-1).tolist()], path))
        used = set(names)
    elif dict_class == "JumpReluAutoEncoder":
        names = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]
        W_enc, b_enc, W_dec, b_dec, thr = _take(sd, names, where)
        t = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
             "log_threshold": log_threshold(thr, str(where))}
        used = set(names)
    else:  # GatedAutoEncoder
        names = ["encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "mag_bias", "r_mag"]
        enc, dec, b_dec, b_gate, b_mag, r_mag = _take(sd, names, where)
        t = {"W_enc": enc.T, "W_dec": dec.T, "b_dec": b_dec, "b_gate": b_gate, "b_mag": b_mag, "r_mag": r_mag}
        used = set(names)
    extra = sorted(set(sd) - used)
    if extra:
        raise SaeforgeError(f"{where}: entries {extra} have no meaning for a {dict_class}")
    if normalize_decoder and dict_class != "AutoEncoder":
        extras["normalize_decoder_ignored"] = True  # load_dictionary leaves the other classes unchanged
    d_in, d_sae = int(t["W_enc"].shape[0]), int(t["W_enc"].shape[1])
    for key, val in (("activation_dim", d_in), ("dict_size", d_sae)):
        if tr.get(key) not in (None, val):
            raise SaeforgeError(f"{path / CFG}: {key}={tr[key]} but the weights give {val}")
    md = source_metadata(DICTIONARY_LEARNING, "dictionary_learning", None, path, conf, dict_class=dict_class,
                         normalize_decoder=bool(normalize_decoder and dict_class == "AutoEncoder"), **extras)
    return build_sae(arch, t, device, where=str(path), d_in=d_in, d_sae=d_sae, hook=tr.get("submodule_name"),
                     model=tr.get("lm_name"), apply_b_dec_to_input=dict_class != "JumpReluAutoEncoder",
                     metadata=md, **kw)


def _matryoshka_config(tr: dict[str, Any], k: int, sizes: list[int], path: Path) -> dict[str, Any]:
    """saeforge Matryoshka settings from ae.pt's ``k``/``group_sizes`` and config.json's group fields."""
    for key, val in (("k", k), ("group_sizes", sizes)):
        if tr.get(key) is not None and tr[key] != val:
            raise SaeforgeError(f"{path}: {key} is {val} in ae.pt but {tr[key]} in config.json; the two files come "
                                "from different runs: restore the pair")
    kw: dict[str, Any] = {"k": k, "group_sizes": sizes}
    weights = tr.get("group_weights")
    if weights is not None:
        if len(weights) != len(sizes):
            raise SaeforgeError(f"{path / CFG}: group_weights has {len(weights)} entries for {len(sizes)} groups")
        kw["group_weights"] = [float(w) for w in weights]
    if tr.get("group_fractions") is not None:
        kw["group_fractions"] = [float(f) for f in tr["group_fractions"]]
    return kw


def _trainer_config(sae: SAE, spec: ExportSpec, dict_class: str, src: dict[str, Any]) -> dict[str, Any]:
    cfg = sae.cfg
    old = src.get("trainer") or {}
    if old.get("dict_class") != dict_class:
        old = {}
    tr = {key: old.get(key) for key in TRAINER_KEYS[dict_class]}
    tr.update(dict_class=dict_class, activation_dim=cfg.d_in, dict_size=cfg.d_sae)
    if "k" in tr:
        tr["k"] = spec.k
    if dict_class == MATRYOSHKA and spec.groups:
        tr["group_sizes"] = list(spec.groups)
        tr["group_weights"] = list(spec.group_weights or [1.0 / len(spec.groups)] * len(spec.groups))
        if tr.get("group_fractions") is None or len(tr["group_fractions"]) != len(spec.groups):
            tr["group_fractions"] = [s / cfg.d_sae for s in spec.groups]
    if not old:
        tr.update(trainer_class=TRAINER[dict_class], device="cpu", wandb_name=dict_class, layer=first_int(cfg.hook),
                  lm_name=cfg.model, submodule_name=cfg.hook)
    buffer = src.get("buffer") or {key: None for key in BUFFER_KEYS}
    if not src.get("buffer"):
        buffer.update(d_submodule=cfg.d_in, device="cpu")
    return {"trainer": tr, "buffer": buffer}


def save(sae: SAE, path: Path, **_: Any) -> Path:
    """Write ``path/ae.pt`` + ``path/config.json`` (the folder ``load_dictionary(path)`` reads)."""
    cfg = sae.cfg
    arch = cfg.arch
    spec = spec_of(sae, DICTIONARY_LEARNING)
    require(not cfg.skip and not cfg.is_transcoder, DICTIONARY_LEARNING, arch,
            "dictionary_learning dictionaries are autoencoders (no transcoders, no skip connection)")
    require_plain_input(sae, DICTIONARY_LEARNING)
    dict_class = MATRYOSHKA if spec.activation == "batchtopk" and spec.groups else DICT_CLASS[spec.activation]
    ex = export_tensors(sae, DICTIONARY_LEARNING, subtract_b_dec=dict_class != "JumpReluAutoEncoder")
    t = ex.tensors
    md = cfg.metadata or {}
    src = (md.get("source_config") or {}) if md.get("source_format") == DICTIONARY_LEARNING else {}
    enc, dec = t["W_enc"].T.contiguous(), t["W_dec"].T.contiguous()
    if dict_class == "AutoEncoder":
        sd = {"bias": t["b_dec"], "encoder.weight": enc, "encoder.bias": t["b_enc"], "decoder.weight": dec}
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        if dict_class == "BatchTopKSAE":
            thr = t["threshold"].reshape(())
        else:
            thr = torch.tensor(float(md.get("dictionary_learning_threshold", TOPK_INIT_THRESHOLD)))
        sd = {"b_dec": t["b_dec"], "k": torch.tensor(spec.k, dtype=torch.int32), "threshold": thr.float(),
              "decoder.weight": dec, "encoder.weight": enc, "encoder.bias": t["b_enc"]}
    elif dict_class == MATRYOSHKA:  # MatryoshkaBatchTopKSAE's own buffer and parameter order
        sd = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
              "k": torch.tensor(spec.k, dtype=torch.int32), "threshold": t["threshold"].reshape(()).float(),
              "group_sizes": torch.tensor(list(spec.groups or []), dtype=torch.int64)}
    elif dict_class == "JumpReluAutoEncoder":
        sd = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    else:
        sd = {"decoder_bias": t["b_dec"], "r_mag": t["r_mag"], "gate_bias": t["b_gate"], "mag_bias": t["b_mag"],
              "encoder.weight": enc, "decoder.weight": dec}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_open(path / AE, "wb") as fh:
        torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, fh)
    write_json_atomic(path / CFG, _trainer_config(sae, spec, dict_class, src), indent=4)
    return path
