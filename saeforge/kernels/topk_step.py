"""The TopK training forward on the sparse kernels: a drop-in body for ``TopKSAE.training_forward``.

Same losses as :meth:`saeforge.sae.topk.TopKSAE.training_forward` (Gao et al. 2024: normalised MSE,
Multi-TopK, AuxK over dead latents), same outputs, but the encoder runs through
:func:`~saeforge.kernels.topk_autograd.topk_encode`: chunked pre-activations, exact fast top-k, AuxK
selected in the same pass, and a backward whose only work is O(B·k·d) sparse products (no dense
``[B, d_sae]`` gradient, no dense ``xᵀ G`` product). The tests check loss and gradients against the
dense implementation and the weights after 20 optimizer steps.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saeforge.distributed.ops import total_variance
from saeforge.kernels.topk_autograd import TopKCodes, sparse_decode, topk_encode


def fired_latents(idx: Tensor, active: Tensor, n: int) -> Tensor:
    """Bool ``[n]``: which latents are active in any row (``idx, active [B, K]``). No host sync."""
    return torch.zeros(n, device=idx.device).index_add_(0, idx.flatten(), active.flatten().float()) > 0


def sparse_auxk_loss(codes: TopKCodes, e: Tensor, dead: Tensor, W_dec: Tensor, denom: Tensor) -> Tensor:
    """AuxK (Gao et al. §A.2) from the sparse codes: ‖ê − e‖² / denom, ê decoded (no bias) from the AuxK
    pairs ``codes.aux_vals / aux_idx``; exactly 0 when no latent is dead (as :func:`~saeforge.sae.functional.auxk_loss`)."""
    if codes.aux_vals.shape[-1] == 0:  # CPU and nothing dead: the dense where() gives exactly 0
        return denom.new_zeros(())
    e_hat = sparse_decode(codes.aux_vals, codes.aux_idx, W_dec, None)
    aux = (e_hat - e.detach()).pow(2).sum() / denom
    return torch.where(dead.any(), aux, torch.zeros_like(aux))


def topk_training_forward(sae: Any, inp: Any, chunk_rows: int | None = None) -> Any:
    """One training forward of a ``TopKSAE`` ``sae`` on ``TrainStepInput`` ``inp`` -> ``TrainStepOutput``."""
    from saeforge.sae.base import TrainStepOutput

    cfg = sae.cfg
    x, y = sae.working_inputs(inp)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dead = inp.dead_mask if (inp.dead_mask is not None and cfg.aux_coef > 0) else None
    k_sel = min(4 * cfg.k, cfg.d_sae) if cfg.multi_topk else cfg.k
    b_pre = sae.b_dec if cfg.apply_b_dec_to_input else None
    b_enc = getattr(sae, "b_enc", None)
    codes = topk_encode(x2, sae.W_enc, b_enc, k_sel, b_pre=b_pre, dead_mask=dead,
                        k_aux=min(cfg.k_aux, cfg.d_sae), chunk_rows=chunk_rows)
    if cfg.multi_topk:  # the top-k of the top-4k are the top-k
        v4, i4 = codes.vals, codes.idx
        top, j = v4.topk(cfg.k, dim=-1, sorted=False)
        vals, idx = top, i4.gather(-1, j)
    else:
        vals, idx = codes.vals, codes.idx
    y2 = y.reshape(-1, y.shape[-1])
    y_hat = sparse_decode(vals, idx, sae.W_dec, sae.b_dec)
    e = y2 - y_hat
    total_var = total_variance(y2).clamp_min(1e-12)  # of the global batch under data parallelism
    mse = e.pow(2).sum() / total_var
    losses = {"mse": mse}
    loss = mse
    if cfg.multi_topk:
        mse4 = (y2 - sparse_decode(v4, i4, sae.W_dec, sae.b_dec)).pow(2).sum() / total_var
        losses["mse_4k"] = mse4
        loss = loss + mse4 / 8
    if dead is not None:
        aux = sparse_auxk_loss(codes, e, dead, sae.W_dec, total_var)
        losses["aux"] = aux
        loss = loss + cfg.aux_coef * aux
    active = vals > 0
    return TrainStepOutput(loss=loss, losses=losses, y_hat=y_hat.reshape(*lead, -1), y=y,
                           fired=fired_latents(idx, active, cfg.d_sae), l0=active.sum(-1).float().mean())
