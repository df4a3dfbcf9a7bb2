"""Custom autograd Functions for the sparse steps of TopK-style SAEs.

Forward: the dense encoder product is computed chunk by chunk (one chunk of pre-activations alive
at a time), each chunk goes straight into a selector (TopK, AuxK, BatchTopK), and only the kept
``(value, index)`` pairs leave the Function. Backward: the gradient w.r.t. the pre-activations is
non-zero only on those pairs (ReLU'd top-k), so

* ``∂L/∂W_enc = x_cᵀ G`` is a sparse ``[n, B] × [B, d]`` product (:func:`scatter_rows`), B·K·d work
  instead of the dense B·n·d that autograd would spend on ``x_cᵀ (∂L/∂H)``;
* ``∂L/∂b_enc`` is an index-add of the K gradients per row;
* ``∂L/∂b_pre = −W_enc (Σ_b ∂L/∂h_b)`` is one matrix-vector product (b_pre is ``b_dec`` when
  ``apply_b_dec_to_input``);
* ``∂L/∂x`` (only when the input itself requires grad) gathers K encoder columns per row.

The sparse decoder (:class:`SparseDecode`) saves nothing dense either: its backward gives the K
value gradients per row (:func:`gather_dots`) and the touched decoder rows (:func:`scatter_rows`).

Precision: under ``torch.autocast`` the encoder product runs in the autocast dtype (as autocast would
run ``x @ W_enc``), the bias is added in fp32 as in the eager model, and every gradient is accumulated
in fp32 for the fp32 master weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.kernels.selectors import BatchTopKSelector, TopKSelector
from saeforge.kernels.sparse_ops import gather_dots, gather_sum, index_sum, scatter_rows

# Dense pre-activation elements per chunk on CPU: 2^22 fp32 = 16 MiB, which stays in a 32 MiB L3
# while it is selected from, and is large enough that the chunk's matrix product runs at full speed.
CPU_CHUNK_ELEMENTS = 1 << 22
# On GPUs a chunk is the whole batch unless that would exceed this many elements (1 GiB in fp32).
GPU_CHUNK_ELEMENTS = 1 << 28

# Benchmarks set this to a dict to get wall-clock seconds per phase ("encode", "topk", "bwd_encoder",
# "bwd_decoder") added into it. Meaningful on CPU only (CUDA work is asynchronous); None costs nothing.
PROFILE: dict[str, float] | None = None


def _tick(key: str, t0: float) -> float:
    t1 = time.perf_counter()
    if PROFILE is not None:
        PROFILE[key] = PROFILE.get(key, 0.0) + (t1 - t0)
    return t1


def default_chunk_rows(B: int, n: int, device: torch.device) -> int:
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, min(B, budget // max(n, 1)))


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        dt = torch.get_autocast_dtype(device.type)
        return dt if dt != torch.float32 else None
    return None


class SparseEncode(torch.autograd.Function):
    """``(x, W_enc, b_enc, b_pre, selector, chunk_rows)`` -> ReLU'd kept values, their indices, extra.

    Outputs: ``selector.n_out`` value tensors ``[B, K_i]``, as many index tensors, and one extra
    tensor (BatchTopK's threshold; an empty tensor for TopK). Indices and the extra are not
    differentiable.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_pre: Tensor | None,
                selector: Any, chunk_rows: int | None) -> tuple[Tensor, ...]:
        dev = x.device
        amp = _amp_dtype(dev)
        B, n = x.shape[0], W_enc.shape[1]
        with torch.autocast(dev.type, enabled=False):
            xc = x.float() if b_pre is None else x.float() - b_pre.float()
            a = xc.to(amp) if amp is not None else xc
            w = W_enc.to(amp) if amp is not None else W_enc
            bias = None if b_enc is None else b_enc.float()
            buf: list[Tensor] = []

            def h_rows(rows: Tensor | slice) -> Tensor:
                part = a[rows]
                if bias is None:
                    return part @ w
                if amp is None:  # fp32: reuse one chunk buffer (no page faults), bias added in place
                    if not buf or buf[0].shape[0] != part.shape[0]:
                        buf[:] = [torch.empty(part.shape[0], n, dtype=w.dtype, device=dev)]
                    return torch.mm(part, w, out=buf[0]).add_(bias)
                return (part @ w) + bias  # bf16/fp16 product, fp32 bias: promotes to fp32 like eager

            step = chunk_rows or default_chunk_rows(B, n, dev)
            selector.begin(B, n, dev)
            t = time.perf_counter()
            for lo in range(0, B, step):
                h = h_rows(slice(lo, min(B, lo + step)))
                t = _tick("encode", t)
                selector.chunk(h)
                t = _tick("topk", t)
            del h
            vals, idx, extra = selector.finish(h_rows)
            vals = [v.relu() for v in vals]
            _tick("topk", t)
        ctx.n_out = len(vals)
        ctx.n_latents = n
        ctx.save_for_backward(xc, W_enc, *vals, *idx)
        ctx.has_b_pre = b_pre is not None
        ctx.mark_non_differentiable(*idx)
        if extra is None:
            extra = torch.empty(0, device=dev)
        ctx.mark_non_differentiable(extra)
        return (*vals, *idx, extra)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        t0 = time.perf_counter()
        xc, W_enc, *rest = ctx.saved_tensors
        k = ctx.n_out
        vals, idx = rest[:k], rest[k:]
        pairs = [(i, g.float() * (v > 0)) for v, i, g in zip(vals, idx, grads[:k]) if g is not None]
        if not pairs:
            return None, None, None, None, None, None
        I = torch.cat([p[0] for p in pairs], 1) if len(pairs) > 1 else pairs[0][0]
        G = torch.cat([p[1] for p in pairs], 1) if len(pairs) > 1 else pairs[0][1]
        need_x, need_w, need_b, need_pre = ctx.needs_input_grad[:4]
        g_x = g_w = g_b = g_pre = None
        if need_w:
            g_w = scatter_rows(I, G, xc, ctx.n_latents).t().to(W_enc.dtype)
        col = index_sum(I, G, ctx.n_latents) if (need_b or need_pre) else None
        if need_b:
            g_b = col
        if need_pre:
            g_pre = -(W_enc.float() @ col)
        if need_x:
            g_x = gather_sum(I, G, W_enc.float().t().contiguous())
        _tick("bwd_encoder", t0)
        return g_x, g_w, g_b, g_pre, None, None


class SparseDecode(torch.autograd.Function):
    """``Σ_j vals[b,j] · W_dec[idx[b,j]]`` with a backward touching only the K rows and K values."""

    @staticmethod
    def forward(ctx: Any, vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
        lead, K = vals.shape[:-1], vals.shape[-1]
        rows = math.prod(lead)
        i2, v2 = idx.reshape(rows, K), vals.reshape(rows, K)
        ctx.save_for_backward(v2, i2, W_dec)
        ctx.lead = lead
        with torch.autocast(W_dec.device.type, enabled=False):
            return gather_sum(i2, v2, W_dec).reshape(*lead, W_dec.shape[1])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        t0 = time.perf_counter()
        v2, i2, W_dec = ctx.saved_tensors
        g2 = g.reshape(-1, W_dec.shape[1])
        g_v = g_w = None
        if ctx.needs_input_grad[0]:
            g_v = gather_dots(i2, W_dec, g2).to(v2.dtype).reshape(*ctx.lead, v2.shape[-1])
        if ctx.needs_input_grad[2]:
            g_w = scatter_rows(i2, v2, g2, W_dec.shape[0]).to(W_dec.dtype)
        _tick("bwd_decoder", t0)
        return g_v, None, g_w


@dataclass
class TopKCodes:
    """Result of :func:`topk_encode`: ReLU'd top-k ``vals``/``idx`` ``[B, k]``; AuxK's ``aux_vals`` /
    ``aux_idx`` ``[B, k_aux']`` when a dead mask was given (else None)."""

    vals: Tensor
    idx: Tensor
    aux_vals: Tensor | None = None
    aux_idx: Tensor | None = None


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int, *, b_pre: Tensor | None = None,
                dead_mask: Tensor | None = None, k_aux: int = 0, chunk_rows: int | None = None) -> TopKCodes:
    """``TopK(ReLU)((x − b_pre) W_enc + b_enc)`` as sparse codes, plus AuxK's codes over ``dead_mask``.

    Equal (values, gradients) to the dense ``h = (x − b_pre) @ W_enc + b_enc; h.topk(k).values.relu()``,
    without the ``[B, n]`` tensor in memory or the dense products in backward. ``x`` is ``[B, d_in]``
    (flatten leading dims first); ``W_enc`` is ``[d_in, n]`` as in :class:`saeforge.sae.base.SAE`.
    Pass ``k = 4·k`` and re-select with :func:`torch.topk` on the values for Multi-TopK: the top-k of
    the top-4k are the top-k.
    """
    want_aux = dead_mask is not None and k_aux > 0
    sel = TopKSelector(k, dead_mask if want_aux else None, k_aux if want_aux else 0)
    out = SparseEncode.apply(x, W_enc, b_enc, b_pre, sel, chunk_rows)
    if want_aux:
        return TopKCodes(out[0], out[2], out[1], out[3])
    return TopKCodes(out[0], out[1])


def batch_topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int, *, b_pre: Tensor | None = None,
                      chunk_rows: int | None = None, cand_factor: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK training codes: the top ``B·k`` ReLU'd pre-activations of the batch, as padded sparse
    rows ``(vals [B, K], idx [B, K])`` (padding has value 0), and the batch threshold θ (0-d tensor,
    the smallest kept value; Bussmann et al. average it into the inference threshold)."""
    out = SparseEncode.apply(x, W_enc, b_enc, b_pre, BatchTopKSelector(k, cand_factor), chunk_rows)
    return out[0], out[1], out[2]


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, bias: Tensor | None = None) -> Tensor:
    """``vals, idx [..., K]`` and ``W_dec [n, d_out]`` -> ``[..., d_out]`` (+ ``bias``)."""
    out = SparseDecode.apply(vals, idx, W_dec)
    return out + bias if bias is not None else out


def dense_to_sparse(f: Tensor) -> tuple[Tensor, Tensor]:
    """Dense codes ``[B, n]`` (e.g. JumpReLU's) -> padded ``(vals, idx) [B, K]`` for :func:`sparse_decode`.

    ``K`` is the largest number of non-zeros in a row (read back from the device once). Gradients
    flow back into ``f`` at the kept positions, so JumpReLU keeps its own straight-through estimators
    on the encoder side and only the decoder becomes sparse.
    """
    nz = f != 0
    K = max(1, int(nz.sum(-1).max()))
    K = min(K, f.shape[-1])
    idx = nz.to(torch.int8).topk(K, dim=-1, sorted=False).indices
    return f.gather(-1, idx), idx
