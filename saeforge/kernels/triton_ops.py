"""Triton kernels for the sparse SAE primitives on CUDA (used only when ``triton`` imports).

The same three operations as :mod:`saeforge.kernels.sparse_ops` (whose torch code is the fallback
and the reference in the tests):

* ``gather_sum``   ``out[b] = Σ_j w[b,j] · W[idx[b,j]]``      one program per (row, d-block);
* ``gather_dots``  ``out[b,j] = ⟨W[idx[b,j]], g[b]⟩``          one program per (row, K-block);
* ``scatter_rows`` ``out[idx[b,j]] += w[b,j] · src[b]``         one program per (row, d-block),
  fp32 ``atomic_add`` into the output (the accumulation order, not the result, is nondeterministic).

All accumulate in fp32 whatever the storage dtype. These are the operations sparsify (EleutherAI) runs
in Triton for its TopK decoder; the kernels here are written from the definitions above.
Triton is imported lazily (the kernels live in ``_triton_kernels``, imported on first use), so importing
this module never fails and CPU-only installs pay nothing.
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


def _kernels():
    """The jitted kernels (imports Triton on first use; the module needs ``tl`` as a global)."""
    import triton

    from saeforge.kernels import _triton_kernels as k

    return triton, k.gather_sum_kernel, k.gather_dots_kernel, k.scatter_rows_kernel


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
