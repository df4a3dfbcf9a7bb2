"""Triton kernels for the sparse SAE primitives on CUDA (used only when ``triton`` imports).

The same three operations as :mod:`saeforge.kernels.sparse_ops` (whose torch code is the fallback
and the reference in the tests):

* ``gather_sum``   ``out[b] = Σ_j w[b,j] · W[idx[b,j]]``      one program per (row, d-block);
* ``gather_dots``  ``out[b,j] = ⟨W[idx[b,j]], g[b]⟩``          one program per (row, K-block);
* ``scatter_rows`` ``out[idx[b,j]] += w[b,j] · src[b]``         one program per (row, d-block),
  fp32 ``atomic_add`` into the output (the accumulation order, not the result, is nondeterministic).

All accumulate in fp32 whatever the storage dtype. These are the operations sparsify (EleutherAI) runs
in Triton for its TopK decoder; the kernels here are written from the definitions above.
Triton is imported lazily, so importing this module never fails and CPU-only installs pay nothing.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: use the torch path
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum_kernel(idx_ptr, w_ptr, W_ptr, out_ptr, K, D,
                          BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        pd = tl.program_id(1)
        cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(0, K):
            row = tl.load(idx_ptr + b * K + j).to(tl.int64)
            wv = tl.load(w_ptr + b * K + j).to(tl.float32)
            vec = tl.load(W_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            acc += wv * vec
        tl.store(out_ptr + b.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def gather_dots_kernel(idx_ptr, W_ptr, g_ptr, out_ptr, K, D,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        pk = tl.program_id(1)
        js = pk * BLOCK_K + tl.arange(0, BLOCK_K)
        jmask = js < K
        rows = tl.load(idx_ptr + b * K + js, mask=jmask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            gv = tl.load(g_ptr + b.to(tl.int64) * D + cols, mask=cmask, other=0.0).to(tl.float32)
            tile = tl.load(W_ptr + rows[:, None] * D + cols[None, :],
                           mask=jmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(tile * gv[None, :], axis=1)
        tl.store(out_ptr + b * K + js, acc, mask=jmask)

    @triton.jit
    def scatter_rows_kernel(idx_ptr, w_ptr, src_ptr, out_ptr, K, D,
                            BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        pd = tl.program_id(1)
        cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        sv = tl.load(src_ptr + b.to(tl.int64) * D + cols, mask=cmask, other=0.0).to(tl.float32)
        for j in range(0, K):
            row = tl.load(idx_ptr + b * K + j).to(tl.int64)
            wv = tl.load(w_ptr + b * K + j).to(tl.float32)
            tl.atomic_add(out_ptr + row * D + cols, wv * sv, mask=cmask)

    return triton, gather_sum_kernel, gather_dots_kernel, scatter_rows_kernel


def _block_d(D: int) -> int:
    return min(256, max(16, 1 << (D - 1).bit_length()))


def gather_sum(idx: Tensor, w: Tensor, W: Tensor) -> Tensor:
    triton, kern, _, _ = _kernels()
    B, K = idx.shape
    D = W.shape[1]
    idx, w, W = idx.contiguous(), w.contiguous(), W.contiguous()
    out = torch.empty(B, D, device=W.device, dtype=W.dtype)
    bd = _block_d(D)
    kern[(B, triton.cdiv(D, bd))](idx, w, W, out, K, D, BLOCK_D=bd)
    return out


def gather_dots(idx: Tensor, W: Tensor, g: Tensor) -> Tensor:
    triton, _, kern, _ = _kernels()
    B, K = idx.shape
    D = W.shape[1]
    idx, W, g = idx.contiguous(), W.contiguous(), g.contiguous()
    out = torch.empty(B, K, device=W.device, dtype=torch.float32)
    bk = min(64, max(16, 1 << (K - 1).bit_length()))
    kern[(B, triton.cdiv(K, bk))](idx, W, g, out, K, D, BLOCK_K=bk, BLOCK_D=64)
    return out


def scatter_rows(idx: Tensor, w: Tensor, src: Tensor, n: int) -> Tensor:
    triton, _, _, kern = _kernels()
    B, K = idx.shape
    D = src.shape[1]
    idx, w, src = idx.contiguous(), w.float().contiguous(), src.contiguous()
    out = torch.zeros(n, D, device=src.device, dtype=torch.float32)
    bd = _block_d(D)
    kern[(B, triton.cdiv(D, bd))](idx, w, src, out, K, D, BLOCK_D=bd)
    return out
