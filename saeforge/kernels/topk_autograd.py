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
in fp32 for the fp32 master weights. In fp32 the bias rides in the product (``addmm``): no second pass over the
``[B, n]`` pre-activations (their last bits may differ from ``mm`` + ``add``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.kernels.selectors import BatchTopKSelector, TopKSelector
from saeforge.kernels.sparse_ops import gather_dots, gather_sum, index_sum, scatter_rows, shared_bags

# Dense pre-activation elements held at once (one chunk of rows): 2^28 = 1 GiB in fp32. The default
# keeps a 4096 × 16384 batch in one chunk: on a busy 2-core CPU each chunk costs a few thread
# barriers, and fewer, larger chunks measured faster than cache-sized ones (docs/performance.md).
# Lower it with ``set_chunk_elements`` (or pass ``chunk_rows``) when memory is tight.
CHUNK_ELEMENTS = {"cpu": 1 << 28, "other": 1 << 28}

# CPU only: one reusable buffer per dtype for the chunk products, so a step does not page-fault a fresh
# multi-hundred-MB ``mmap`` (glibc serves large blocks that way; CUDA has its caching allocator).
_WORKSPACE: dict[tuple[str, torch.dtype], Tensor] = {}


def set_chunk_elements(n: int, device_type: str = "cpu") -> None:
    """Cap the dense pre-activations alive at once at ``n`` elements (``device_type``: "cpu" or "other")."""
    if n < 1:
        raise ValueError(f"chunk size must be positive, got {n}")
    CHUNK_ELEMENTS["cpu" if device_type == "cpu" else "other"] = int(n)


def release_workspace() -> None:
    """Free the cached CPU chunk buffers (they are re-created on the next call)."""
    _WORKSPACE.clear()


def _workspace(rows: int, n: int, dtype: torch.dtype) -> Tensor:
    key = ("cpu", dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < rows * n:
        _WORKSPACE.pop(key, None)
        buf = _WORKSPACE[key] = torch.empty(rows * n, dtype=dtype)
    return buf[: rows * n].view(rows, n)


def default_chunk_rows(B: int, n: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    return max(1, min(B, budget // max(n, 1)))


# Benchmarks set this to a dict to get wall-clock seconds per phase ("encode", "topk", "bwd_encoder",
# "bwd_decoder") added into it. Meaningful on CPU only (CUDA work is asynchronous); None costs nothing.
PROFILE: dict[str, float] | None = None


def _tick(key: str, t0: float) -> float:
    t1 = time.perf_counter()
    if PROFILE is not None:
        PROFILE[key] = PROFILE.get(key, 0.0) + (t1 - t0)
    return t1


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

            def h_rows(rows: Tensor | slice) -> Tensor:
                part = a[rows]
                if bias is not None and amp is not None:
                    return (part @ w) + bias  # bf16/fp16 product, fp32 bias: promotes to fp32 like eager
                out = _workspace(part.shape[0], n, w.dtype) if dev.type == "cpu" else None
                if bias is None:
                    return torch.mm(part, w, out=out)
                # the bias rides in the product's epilogue instead of a second pass over [rows, n]
                return torch.addmm(bias, part, w, out=out)

            step = chunk_rows or default_chunk_rows(B, n, dev)
            selector.begin(B, n, dev)
            t = time.perf_counter()
            for lo in range(0, B, step):
                h = h_rows(slice(lo, min(B, lo + step)))
                t = _tick("encode", t)
                selector.chunk(h)
                t = _tick("topk", t)
            vals, idx, extra = selector.finish(h_rows)
            vals = [v.relu() for v in vals]
            _tick("topk", t)
        ctx.n_out = len(vals)
        ctx.n_latents = n
        ctx.save_for_backward(xc, W_enc, *vals, *idx)
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
        bags = shared_bags(i2, W_dec)  # one sort for both products
        if ctx.needs_input_grad[0]:
            g_v = gather_dots(i2, W_dec, g2, bags).to(v2.dtype).reshape(*ctx.lead, v2.shape[-1])
        if ctx.needs_input_grad[2]:
            g_w = scatter_rows(i2, v2, g2, W_dec.shape[0], bags).to(W_dec.dtype)
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
                      dead_mask: Tensor | None = None, k_aux: int = 0, chunk_rows: int | None = None,
                      cand_factor: int = 4) -> tuple[TopKCodes, Tensor]:
    """BatchTopK training codes (Bussmann, Leask & Nanda 2024): the top ``B·k`` ReLU'd pre-activations
    of the batch as padded sparse rows ``codes.vals, codes.idx [B, K]`` (padding has value 0), AuxK's
    codes over ``dead_mask`` as in :func:`topk_encode`, and the batch threshold θ (0-d tensor: the
    smallest kept value, which the paper averages into the inference threshold)."""
    want_aux = dead_mask is not None and k_aux > 0
    sel = BatchTopKSelector(k, cand_factor, dead_mask if want_aux else None, k_aux if want_aux else 0)
    out = SparseEncode.apply(x, W_enc, b_enc, b_pre, sel, chunk_rows)
    if want_aux:
        return TopKCodes(out[0], out[2], out[1], out[3]), out[4]
    return TopKCodes(out[0], out[1]), out[2]


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, bias: Tensor | None = None) -> Tensor:
    """``vals, idx [..., K]`` and ``W_dec [n, d_out]`` -> ``[..., d_out]`` (+ ``bias``)."""
    out = SparseDecode.apply(vals, idx, W_dec)
    return out + bias if bias is not None else out


def dense_to_sparse(f: Tensor) -> tuple[Tensor, Tensor]:
    """Dense codes ``[B, n]`` (e.g. JumpReLU's) -> padded ``(vals, idx) [B, K]`` for :func:`sparse_decode`.

    ``K`` is the largest number of non-zeros in a row (read back from the device once); padding has
    value 0 and index 0. O(B·n) to find the non-zeros, then O(nnz). Gradients flow back into ``f`` at
    the kept positions, so JumpReLU keeps its straight-through estimators on the encoder side and only
    the decoder product becomes sparse.
    """
    B = f.shape[0]
    rows, cols = torch.nonzero(f, as_tuple=True)  # row-major: each row's entries are contiguous
    counts = torch.bincount(rows, minlength=B)
    K = max(1, int(counts.max())) if rows.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=f.device) - starts[rows]
    idx = torch.zeros(B, K, dtype=torch.long, device=f.device).index_put_((rows, slot), cols)
    vals = f.new_zeros(B, K).index_put((rows, slot), f[rows, cols])
    return vals, idx
