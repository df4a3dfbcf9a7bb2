"""SAELens checkpoints: ``cfg.json`` (``SAEConfig.to_dict()``, with ``architecture``) + ``sae_weights.safetensors``.

SAELens already uses saeforge's orientation (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]`` with rows =
latents, ``apply_b_dec_to_input`` as a flag), so tensors map one to one. What needs care (checked against
sae-lens 6.54.12 fixtures):

* ``rescale_acts_by_decoder_norm`` (top-k): codes are ``h_j · ‖W_dec[j]‖`` and decode divides the factor back
  out. Folding the norms into ``W_enc``/``b_enc`` and unit-normalising ``W_dec`` gives the same codes and
  reconstruction with a plain top-k (the fold SAELens's own ``save_inference_model`` does).
* JumpReLU stores ``threshold`` (old checkpoints ``log_threshold``); saeforge keeps ``log(threshold)``.
* BatchTopK is saved for inference as ``architecture: "jumprelu"`` with one threshold broadcast over latents;
  it loads as a JumpReLU SAE (what SAELens loads), the origin stays in ``metadata``.
* ``normalize_activations``: ``layer_norm`` and ``constant_norm_rescale`` are applied at run time and map to
  ``input_norm``; ``expected_average_only_in`` is *not* applied by SAELens's ``load_from_disk`` (the runner
  folds the factor into the weights before saving), so it loads as ``none``.
* Transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``) never
  subtract ``b_dec`` and never de-normalise their output; ``W_skip [d_out, d_in]`` is added by ``forward`` only.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saeforge.errors import SaeforgeError
from saeforge.hooknames import to_saeforge, to_transformerlens
from saeforge.formats.common import (
    SAELENS,
    build_sae,
    export_tensors,
    fold_decoder_norms,
    log_threshold,
    per_latent_threshold,
    read_json,
    require,
    source_metadata,
    spec_of,
)
from saeforge.io import save_safetensors_atomic, write_json_atomic
from saeforge.sae import SAE
from saeforge.sae.base import ExportSpec

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
WRITES_VERSION = "6.54.12"  # the SAELens release whose layout the writer reproduces (tested on its fixtures)

# SAELens architecture -> (saeforge arch, is transcoder, has W_skip)
ARCHS: dict[str, tuple[str, bool, bool]] = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "gated": ("gated", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
# what each SAELens architecture stores besides W_enc/W_dec/b_dec (SAELens's own vocabulary)
GATE_TENSORS = ("b_gate", "r_mag", "b_mag")  # "gated": no b_enc
THRESHOLDED = {"jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"}  # threshold (or log_threshold)
NORMS = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale",
         "expected_average_only_in": "none"}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).exists() and (path / CFG).exists()


def _architecture(cfg: dict[str, Any], where: Path) -> tuple[str, int | None]:
    """The SAELens architecture name, reading pre-6.0 configs (``activation_fn_str: "topk"``) too."""
    name = cfg.get("architecture") or "standard"
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if name == "standard" and act == "topk":
        return "topk", kwargs.get("k")
    if act not in ("relu", "topk"):
        raise SaeforgeError(f"{where}: SAELens activation_fn {act!r} has no saeforge equivalent (relu, topk)")
    if name not in ARCHS:
        raise SaeforgeError(
            f"{where}: SAELens architecture {name!r} has no saeforge equivalent; supported: {', '.join(ARCHS)}"
        )
    return name, cfg.get("k")


def load(path: Path, device: str | torch.device = "cpu", **_: Any) -> SAE:
    cfg = read_json(path / CFG)
    where = path / CFG
    arch_name, k = _architecture(cfg, where)
    arch, transcoder, skip = ARCHS[arch_name]
    norm = cfg.get("normalize_activations") or "none"
    if norm not in NORMS:
        raise SaeforgeError(
            f"{where}: normalize_activations={norm!r} cannot be represented in saeforge (it handles "
            f"{', '.join(NORMS)}); fold it into the weights first"
        )
    reshape = cfg.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise SaeforgeError(f"{where}: reshape_activations={reshape!r} is not known (none, hook_z)")
    w = load_file(str(path / WEIGHTS))
    meta = cfg.get("metadata") or {}
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out") or w["W_dec"].shape[1])
    apply_b = bool(cfg.get("apply_b_dec_to_input", True))
    if transcoder and apply_b:
        raise SaeforgeError(f"{where}: a {arch_name} cannot have apply_b_dec_to_input=true (SAELens rejects it)")
    # TransformerLens names -> saeforge aliases where the table has one (saeforge/hooknames.py)
    hook = to_saeforge(meta.get("hook_name") or cfg.get("hook_name"))
    target = to_saeforge(meta.get("hook_name_out") or cfg.get("hook_name_out") or None)
    if transcoder and NORMS[norm] != "none" and not target and d_out == d_in:
        raise SaeforgeError(f"{where}: a {arch_name} with normalize_activations={norm!r} needs "
                            "metadata.hook_name_out so saeforge knows not to de-normalise its output")

    t: dict[str, torch.Tensor] = {}
    taken = {"W_enc", "W_dec", "b_dec"}
    for name in taken:
        if name not in w:
            raise SaeforgeError(f"{path / WEIGHTS}: tensor {name} is missing; is this a SAELens checkpoint?")
        t[name] = w[name]
    for name in GATE_TENSORS if arch_name == "gated" else ("b_enc",):
        t[name] = w[name]
        taken.add(name)
    if arch_name in THRESHOLDED:
        if "threshold" in w:
            thr, taken = w["threshold"], taken | {"threshold"}
        elif "log_threshold" in w:
            thr, taken = w["log_threshold"].double().exp(), taken | {"log_threshold"}
        else:
            raise SaeforgeError(f"{path / WEIGHTS}: a jumprelu SAE needs a threshold (or log_threshold) tensor")
        t["log_threshold"] = log_threshold(thr, str(path / WEIGHTS))
    if skip:
        t["W_skip"] = w["W_skip"]
        taken.add("W_skip")
    if "scaling_factor" in w:  # pre-6.0 finetuning_scaling_factor; harmless only when all ones
        if not torch.all(w["scaling_factor"] == 1):
            raise SaeforgeError(f"{path / WEIGHTS}: a non-unit scaling_factor (finetuning_scaling_factor) cannot "
                                "be represented; fold it into W_dec first")
        taken.add("scaling_factor")
    extra = sorted(set(w) - taken)
    if extra:
        raise SaeforgeError(f"{path / WEIGHTS}: tensors {extra} have no meaning for a SAELens {arch_name} SAE")

    kw: dict[str, Any] = {}
    rescaled = False
    if arch_name == "topk":
        if k is None:
            raise SaeforgeError(f"{where}: a topk SAE needs 'k'")
        kw["k"] = int(k)
        if cfg.get("rescale_acts_by_decoder_norm"):
            t["W_enc"], t["b_enc"], t["W_dec"] = fold_decoder_norms(t["W_enc"], t["b_enc"], t["W_dec"])
            rescaled = True
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    md = source_metadata(SAELENS, "sae_lens", version, path, cfg, source_architecture=arch_name)
    if rescaled:
        md["folded_decoder_norms"] = True
    if reshape != "none":
        md["reshape_activations"] = reshape
    if norm == "expected_average_only_in":
        md["normalize_activations"] = norm  # not applied by SAELens on load either
    return build_sae(
        arch, t, device, where=str(path), d_in=d_in, d_sae=d_sae, d_out=d_out, hook=hook, target_hook=target,
        model=meta.get("model_name") or cfg.get("model_name"), apply_b_dec_to_input=apply_b,
        input_norm=NORMS[norm], skip=skip, metadata=md, **kw,
    )


def _source(sae: SAE) -> dict[str, Any]:
    md = sae.cfg.metadata or {}
    return (md.get("source_config") or {}) if md.get("source_format") == SAELENS else {}


# ExportSpec activation -> (SAELens SAE architecture, its transcoder architectures (plain, with W_skip))
WRITES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "relu": ("standard", ("transcoder", "skip_transcoder")),
    "jumprelu": ("jumprelu", ("jumprelu_transcoder", "jumprelu_skip_transcoder")),
    "batchtopk": ("jumprelu", ("jumprelu_transcoder", "jumprelu_skip_transcoder")),  # SAELens saves it so
    "topk": ("topk", None),
    "gated": ("gated", None),
}


def _training_architecture(spec: ExportSpec) -> tuple[str, dict[str, Any]] | None:
    """SAELens's ``metadata.training_architecture`` for an SAE it stores under another architecture: BatchTopK
    and Matryoshka BatchTopK train with a batch top-k and are saved as ``jumprelu`` (as SAELens does)."""
    if spec.activation != "batchtopk":
        return None
    if spec.groups:
        widths = [int(w) for w in itertools.accumulate(spec.groups)]
        return "matryoshka_batchtopk", {"k": spec.k, "matryoshka_widths": widths}
    return "batchtopk", {"k": spec.k}


def save(sae: SAE, path: Path, **_: Any) -> Path:
    cfg = sae.cfg
    arch = cfg.arch
    spec = spec_of(sae, SAELENS)
    src = _source(sae)
    src_transcoder = ARCHS.get(src.get("architecture", ""), ("", False, False))[1]
    transcoder = cfg.is_transcoder or cfg.skip or src_transcoder
    plain, transcoders = WRITES[spec.activation]
    if transcoder:
        require(transcoders is not None, SAELENS, arch, "SAELens has no top-k or gated transcoder",
                "use --to sparsify (top-k transcoders) or saeforge")
        name = transcoders[1] if cfg.skip else transcoders[0]
        require(cfg.input_norm == "none" or cfg.is_transcoder, SAELENS, arch,
                "a SAELens transcoder never de-normalises its output")
    else:
        name = plain
    ex = export_tensors(sae, SAELENS, subtract_b_dec=False if transcoder else None)
    t = ex.tensors
    out = {"W_dec": t["W_dec"], "W_enc": t["W_enc"], "b_dec": t["b_dec"]}
    for bias, _scale in spec.encoder_biases:
        out[bias] = t[bias]
    out.update({k: t[k] for k in spec.tensors if k != "threshold"})  # gated: r_mag beside its biases
    if "threshold" in spec.tensors:
        out["threshold"] = per_latent_threshold(ex)
    if cfg.skip:
        out["W_skip"] = t["W_skip"]

    meta = dict(src.get("metadata") or {})
    meta.setdefault("sae_lens_version", WRITES_VERSION)
    meta.setdefault("sae_lens_training_version", WRITES_VERSION)
    meta["model_name"] = cfg.model
    meta["hook_name"] = to_transformerlens(cfg.hook)  # the names SAELens users hook (saeforge/hooknames.py)
    if cfg.target_hook and cfg.target_hook != cfg.hook:
        meta["hook_name_out"] = to_transformerlens(cfg.target_hook)
    trained_as = _training_architecture(spec)
    if trained_as is not None:
        meta["training_architecture"], meta["training_architecture_details"] = trained_as
    d: dict[str, Any] = {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": ex.subtract_b_dec, "normalize_activations": cfg.input_norm,
        "reshape_activations": (cfg.metadata or {}).get("reshape_activations", "none"), "metadata": meta,
    }
    if spec.activation == "topk":
        d["k"] = spec.k
        d["rescale_acts_by_decoder_norm"] = False  # decoder norms are folded in
    if transcoder:
        d["d_out"] = cfg.d_out
    d["architecture"] = name
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(path / WEIGHTS, out)
    write_json_atomic(path / CFG, d)
    return path
