"""What each latent's decoder direction does: its direct effect on the logits, and its nearest latents.

**Logit effects** (the "logit lens" on a decoder row, as in Bricken et al. 2023 "Towards Monosemanticity" and
Neuronpedia): the direction ``d_i = W_dec[i] / ‖W_dec[i]‖`` (decoder norms folded into the activations, so
latents compare on one scale) is pushed through the model's final norm and unembedding, keeping only the part
that is linear in ``d_i``:

* RMSNorm ``g ⊙ x / rms(x)``: effect ``(g ⊙ d_i) · W_Uᵀ`` (the positive factor 1/rms is dropped);
  Gemma's RMSNorm multiplies by ``1 + g`` and is read that way;
* LayerNorm ``g ⊙ (x − mean x) / std(x) + b``: effect ``(g ⊙ (d_i − mean d_i)) · W_Uᵀ`` (the bias does not
  depend on ``d_i``);
* no final norm found: ``d_i · W_Uᵀ``.

For a transcoder ``W_dec`` lives in the *output* hook's space, so these are the output's logit effects.

**Nearest latents**: cosine similarity between decoder rows, computed in blocks so a 65k-latent SAE never
holds the full m×m matrix.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from saeforge.models.families import FAMILIES, base_prefix, family_of


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The model's final norm: its family's ``final_norm`` (saeforge/models/families.py: ``model.norm`` for
    Llama, Mistral, Qwen, Gemma; ``transformer.ln_f`` for GPT-2; ``gpt_neox.final_layer_norm``); for a family
    without one, the last registered norm module that lives outside the block list."""
    modules = dict(model.named_modules())
    fam = FAMILIES.get(family_of(model) or "")
    if fam is not None and fam.final_norm is not None:
        base = base_prefix(modules, fam)
        if base is not None and base + fam.final_norm in modules:
            return modules[base + fam.final_norm]
    found = None
    for name, mod in model.named_modules():
        if not name or any(part.isdigit() for part in name.split(".")):
            continue
        cls = type(mod).__name__
        if "Norm" in cls and hasattr(mod, "weight"):
            found = mod
    return found


def norm_gain(norm: nn.Module | None, d: int) -> tuple[Tensor | None, bool]:
    """``(gain, center)`` of a final norm: the per-dimension scale and whether it subtracts the mean."""
    if norm is None:
        return None, False
    cls = type(norm).__name__
    w = getattr(norm, "weight", None)
    gain = None if w is None else w.detach().float().reshape(-1)
    if gain is not None and gain.numel() != d:
        return None, False
    if re.search(r"Gemma\d*\w*RMSNorm", cls) and gain is not None:
        gain = 1.0 + gain  # Gemma: x * (1 + weight)
    center = "LayerNorm" in cls and "RMS" not in cls
    return gain, center


def unembedding(loaded: Any) -> tuple[Tensor, Tensor | None, bool] | None:
    """``(W_U [V, d], gain, center)`` of a loaded causal LM, or None when the model has no LM head."""
    model = loaded if isinstance(loaded, nn.Module) else loaded.model  # a LoadedModel or the HF module itself
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None
    W_U = head.weight.detach().float()
    gain, center = norm_gain(find_final_norm(model), W_U.shape[1])
    return W_U, gain, center


def _row_histograms(x: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-width histograms of each row of ``x`` over its own [min, max]: (counts [n, bins], lo, hi)."""
    lo, hi = x.min(1).values, x.max(1).values
    width = (hi - lo).clamp_min(1e-12)
    idx = ((x - lo[:, None]) / width[:, None] * bins).floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(x.shape[0], bins, dtype=torch.long, device=x.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts, lo, hi


@torch.no_grad()
def logit_effects(W_dec: Tensor, W_U: Tensor, gain: Tensor | None = None, center: bool = False, k: int = 10,
                  bins: int = 40, block: int = 256) -> dict[str, Tensor]:
    """Top-``k`` / bottom-``k`` logit effects of each decoder row and a histogram over the vocabulary.

    Returns ``top_vals, top_ids, bot_vals, bot_ids`` ([m, k]; bottom ones most negative first),
    ``hist`` [m, bins], ``hist_lo``, ``hist_hi`` [m].
    """
    W_dec, W_U = W_dec.float(), W_U.float().to(W_dec.device)
    k = min(k, W_U.shape[0])
    out: dict[str, list[Tensor]] = {n: [] for n in ("top_vals", "top_ids", "bot_vals", "bot_ids", "hist",
                                                    "hist_lo", "hist_hi")}
    for s in range(0, W_dec.shape[0], block):
        d = W_dec[s:s + block]
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if center:
            d = d - d.mean(1, keepdim=True)
        if gain is not None:
            d = d * gain.to(d.device)
        eff = d @ W_U.T
        tv, ti = eff.topk(k, dim=1)
        bv, bi = eff.topk(k, dim=1, largest=False)
        counts, lo, hi = _row_histograms(eff, bins)
        for n, v in zip(out, (tv, ti, bv, bi, counts, lo, hi)):
            out[n].append(v)
    return {n: torch.cat(v) for n, v in out.items()}


def logit_effects_for_model(W_dec: Tensor, loaded: Any, k: int = 10, bins: int = 40) -> dict[str, Tensor] | None:
    """:func:`logit_effects` through ``loaded``'s final norm and unembedding; None when the model has no LM
    head or the decoder's width is not the model's (e.g. a transcoder into a non-residual space)."""
    u = unembedding(loaded)
    if u is None:
        return None
    W_U, gain, center = u
    if W_U.shape[1] != W_dec.shape[1]:
        return None
    return logit_effects(W_dec, W_U, gain, center, k=k, bins=bins)


@torch.no_grad()
def decoder_neighbors(W_dec: Tensor, n: int = 10, block: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``n`` other latents whose decoder rows have the highest cosine similarity: (ids, cos) [m, n]."""
    w = W_dec.float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = w.shape[0]
    n = min(n, m - 1)
    ids, vals = [], []
    for s in range(0, m, block):
        sim = w[s:s + block] @ w.T
        r = torch.arange(sim.shape[0], device=w.device)
        sim[r, r + s] = float("-inf")
        v, i = sim.topk(n, dim=1)
        ids.append(i)
        vals.append(v)
    return torch.cat(ids), torch.cat(vals)
