"""Losses and counts on sparse codes, shared by the sparse training paths of the k-architectures (TopK,
BatchTopK): the AuxK loss from the AuxK pairs an encoder kernel selected, and which latents fired."""
from __future__ import annotations

import torch
from torch import Tensor

from saeforge.kernels.topk_autograd import TopKCodes, sparse_decode


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
