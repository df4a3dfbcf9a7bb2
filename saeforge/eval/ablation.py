"""Sparsity of ablation effects (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", §4.5).

If a latent is a clean "feature", removing it should change the model's predictions in a few specific ways,
not smear a little over the whole vocabulary. At a sampled position ``t`` we encode the activation, then remove
each active latent ``j`` in turn -- subtract its decoded contribution ``dec(f) − dec(f − f_j e_j)`` from the
activation at ``t`` -- rerun the model, and take the logit change at positions ``t .. t+T−1`` (``T`` = 4). Per
position the median change over the vocabulary is subtracted (a latent often shifts all logits by a constant,
which the softmax ignores). With ``v`` the resulting ``T·V`` numbers,

    ablation sparsity = (‖v‖₁ / ‖v‖₂)² / (V · T)

which is the "effective number of logits moved" as a fraction: 1/(V·T) when one logit moves, 1 when all move
equally. It is averaged over all (position, latent) ablations; lower is sparser.

Baselines (named option ``baseline``): ``"clean"`` (default) keeps the SAE's error term -- the unablated run is
the unmodified model and only the latent's contribution is removed; ``"reconstruction"`` splices the SAE's
reconstruction at ``t`` in both runs (error term dropped). Both ablations differ by the same vector; only the
point they are measured around differs.

Batching: one forward per sampled position holds every active latent's ablation as a row (chunked at
``max_batch``); contexts are cut at ``t + T`` since later tokens cannot affect those logits. The model runs
from the start of the context (transformers modules offer no generic "start at layer L" entry), so positions
before ``t`` are recomputed; the numbers are the same as a run started at the hook.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.data.batches import first_contexts
from saeforge.errors import SaeforgeError
from saeforge.eval.shared import sae_hook
from saeforge.hooks import capture, resolve_hook, splice


def vocab_median(x: Tensor) -> Tensor:
    """Median over the last dimension; the mean of the two middle values when its size is even."""
    n = x.shape[-1]
    lo = torch.kthvalue(x, (n + 1) // 2, dim=-1).values
    if n % 2:
        return lo
    return 0.5 * (lo + torch.kthvalue(x, n // 2 + 1, dim=-1).values)


def ablation_sparsity(delta: Tensor, subtract_median: bool = True) -> Tensor:
    """``(‖v‖₁/‖v‖₂)² / (T·V)`` of each logit-change block ``delta [..., T, V]`` -> ``[...]``.

    ``v`` is the block flattened after subtracting each position's median over the vocabulary. A block with
    no change at all gives NaN (the ratio is 0/0).
    """
    if delta.ndim < 2:
        raise SaeforgeError(f"delta must be [..., T, V]; got shape {tuple(delta.shape)}")
    d = delta.double()
    if subtract_median:
        d = d - vocab_median(d)[..., None]
    v = d.flatten(-2)
    l1 = v.abs().sum(-1)
    l2 = v.norm(dim=-1)
    ratio = torch.where(l2 > 0, l1 / l2.clamp_min(1e-300), torch.full_like(l1, float("nan")))
    return ratio.pow(2) / v.shape[-1]


def _positions(keep: Tensor, T: int, per_context: int, g: torch.Generator) -> list[tuple[int, int]]:
    out = []
    for c in range(keep.shape[0]):
        ok = keep[c, : keep.shape[1] - T + 1].nonzero().flatten()
        ok = ok[ok >= 1]
        for i in torch.randperm(ok.numel(), generator=g)[:per_context].tolist():
            out.append((c, int(ok[i])))
    return out


@torch.no_grad()
def run_ablation_sparsity(
    sae,
    model,
    data: str | Iterable[str],
    n_positions: int = 64,
    T: int = 4,
    *,
    hook: str | None = None,
    context_len: int = 64,
    positions_per_context: int = 1,
    baseline: str = "clean",
    subtract_median: bool = True,
    max_batch: int = 64,
    text_field: str = "text",
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Ablation sparsity of ``sae`` at ``n_positions`` seeded positions of ``data`` (see the module docstring).

    Returns ``{"summary": {"ablation_sparsity", "ablation_sparsity_latent_mean", "n_ablations", ...},
    "per_latent": {latent: {"mean", "n"}}, "positions": [[context, position], ...]}``. Contexts are the
    packed contexts of ``data`` in order (``saeforge.data.pack``), so the run can be reproduced.
    """
    if baseline not in ("clean", "reconstruction"):
        raise SaeforgeError(f"baseline={baseline!r}; use 'clean' or 'reconstruction'")
    if not 1 <= T < context_len:
        raise SaeforgeError(f"T={T} must be between 1 and context_len-1={context_len - 1}")
    if not getattr(model, "is_causal", True):
        raise SaeforgeError("ablation sparsity needs next-token logits; use a causal language model")
    in_hook = sae_hook(sae, hook)
    out_hook = sae.cfg.target_hook if sae.cfg.is_transcoder and sae.cfg.target_hook else in_hook
    hp_in, hp_out = resolve_hook(model, in_hook), resolve_hook(model, out_hook)
    dev = next(sae.parameters()).device
    n_ctx = -(-n_positions // positions_per_context)
    batch = first_contexts(model.tokenizer, data, n_ctx, context_len=context_len, text_field=text_field, split=split)
    tokens, keep = batch.tokens, batch.keep
    g = torch.Generator().manual_seed(seed)
    positions = _positions(keep, T, positions_per_context, g)[:n_positions]
    values: list[float] = []
    lat_ids: list[int] = []
    n_active: list[int] = []
    n_zero = 0
    for c, t in tqdm(positions, desc="ablation", disable=not progress):
        ids = tokens[c, : t + T][None]
        acts = capture(model, [hp_in, hp_out], ids, stop_early=True)
        x = acts[hp_in.name][0, t:t + 1].to(dev).float()
        f = sae.encode(x)
        norm_ctx = sae._norm_ctx
        active = f[0].nonzero().flatten()
        n_active.append(int(active.numel()))
        if active.numel() == 0:
            continue
        full = sae.decode(f, norm_ctx)
        base = acts[hp_out.name][0, t].to(dev).float() if baseline == "clean" else sae(x)[0]
        base_logits = _spliced_logits(model, hp_out, ids, t, base[None])
        for s in range(0, active.numel(), max_batch):
            js = active[s:s + max_batch]
            f_abl = f.repeat(js.numel(), 1)
            f_abl[torch.arange(js.numel(), device=dev), js] = 0
            contrib = full - sae.decode(f_abl, norm_ctx)  # [b, d_out]
            logits = _spliced_logits(model, hp_out, ids.expand(js.numel(), -1), t, base[None] - contrib)
            delta = logits[:, t:t + T] - base_logits[:, t:t + T]
            sp = ablation_sparsity(delta, subtract_median)
            for j, v in zip(js.tolist(), sp.tolist()):
                if np.isnan(v):
                    n_zero += 1
                else:
                    values.append(v)
                    lat_ids.append(j)
    if not values:
        raise SaeforgeError("no ablation changed the logits (no active latents at the sampled positions); "
                            "check the SAE's hook and pass more positions")
    per: dict[str, dict[str, float]] = {}
    arr, lat = np.asarray(values), np.asarray(lat_ids)
    for j in np.unique(lat):
        sel = arr[lat == j]
        per[str(int(j))] = {"mean": float(sel.mean()), "n": int(sel.size)}
    V = int(base_logits.shape[-1])
    summary = {
        "ablation_sparsity": float(arr.mean()),
        "ablation_sparsity_latent_mean": float(np.mean([v["mean"] for v in per.values()])),
        "ablation_sparsity_median": float(np.median(arr)),
        "n_ablations": int(arr.size),
        "n_no_effect": n_zero,
        "n_positions": len(positions),
        "n_latents": len(per),
        "mean_active": float(np.mean(n_active)) if n_active else 0.0,
        "T": T,
        "V": V,
        "baseline": baseline,
        "subtract_median": subtract_median,
    }
    return {"summary": summary, "per_latent": per, "positions": [list(p) for p in positions]}


def _spliced_logits(model, hp, ids: Tensor, t: int, rows: Tensor) -> Tensor:
    """Logits ``[B, t+T, V]`` with the activation at ``(row b, position t)`` replaced by ``rows[b]``."""

    def fn(act: Tensor) -> Tensor:
        act = act.clone()
        act[:, t, :] = rows.to(act.device, act.dtype)
        return act

    with splice(model, hp, fn):
        return model.logits(ids).double()
