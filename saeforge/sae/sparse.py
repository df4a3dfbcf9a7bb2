"""Sparse decoding: x̂ = Σ_j vals_j · W_dec[idx_j] + b, without a dense [batch, d_sae] code tensor.

This is the reference torch path (``embedding_bag`` with per-sample weights, as sparsify does without
Triton). Its backward gives gradients only for the touched decoder rows and the k values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, bias: Tensor | None) -> Tensor:
    """``vals, idx [..., k]`` and ``W_dec [d_sae, d_out]`` -> ``[..., d_out]``."""
    lead = vals.shape[:-1]
    k = vals.shape[-1]
    out = F.embedding_bag(
        idx.reshape(-1, k), W_dec, per_sample_weights=vals.reshape(-1, k).to(W_dec.dtype), mode="sum"
    )
    out = out.reshape(*lead, W_dec.shape[1])
    return out + bias if bias is not None else out
