"""In-place decoder-row constraints with no ``[d_sae, d]`` temporaries (exact rewrites of the formulas in
:class:`saeforge.sae.base.SAE`).

Gao et al. 2024 (§A.1) keep decoder rows at unit norm and remove the gradient component parallel to
each row before the optimizer step: ``g ← g − ⟨g, ŵ⟩ ŵ`` with ``ŵ = w / ‖w‖``. Written with broadcasting
that allocates three ``[d_sae, d]`` tensors per step (each a fresh ``mmap`` and page faults on CPU) and
reads the weights five times. Here: one pass for the row norms, one for the dot products, one in-place
``addcmul`` -- the same numbers up to rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def remove_parallel_component_(W: Tensor, G: Tensor, eps: float = 1e-12) -> Tensor:
    """``G[i] -= ⟨G[i], ŵ_i⟩ ŵ_i`` in place, ``ŵ_i = W[i] / max(‖W[i]‖, eps)``; returns ``G``."""
    norm = torch.linalg.vector_norm(W, dim=1).clamp_min_(eps)
    dots = torch.linalg.vecdot(G, W, dim=1)
    coef = dots.div_(norm.square_())  # ⟨g, w⟩ / ‖w‖² = ⟨g, ŵ⟩ / ‖w‖
    return G.addcmul_(W, coef.unsqueeze(1), value=-1)


@torch.no_grad()
def normalize_rows_(W: Tensor, eps: float = 1e-12) -> Tensor:
    """``W[i] /= max(‖W[i]‖, eps)`` in place; returns ``W``."""
    norm = torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min_(eps)
    return W.div_(norm)
