"""Triton kernels behind :mod:`saeforge.kernels.triton_ops` (imported only when Triton is available).

Kept at module level because ``@triton.jit`` resolves names such as ``tl`` in the function's globals.
Each program handles one batch row and one block of columns (see ``triton_ops`` for the maths).
"""
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
