"""Sparse decoding: x̂ = Σ_j vals_j · W_dec[idx_j] + b, without a dense [batch, d_sae] code tensor.

A thin, stable entry point for the architectures; the work is done by
:class:`saeforge.kernels.topk_autograd.SparseDecode`: ``embedding_bag`` forward (a Triton gather on
CUDA), and a backward that produces gradients for the touched decoder rows and the k values only.
"""
from __future__ import annotations

from torch import Tensor

from saeforge.kernels.topk_autograd import SparseDecode


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, bias: Tensor | None) -> Tensor:
    """``vals, idx [..., k]`` and ``W_dec [d_sae, d_out]`` -> ``[..., d_out]`` (+ ``bias`` when given)."""
    out = SparseDecode.apply(vals, idx, W_dec)
    return out + bias if bias is not None else out
