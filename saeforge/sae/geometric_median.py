"""Geometric median by Weiszfeld's algorithm (Weiszfeld 1937; as used by Bricken et al. 2023 and
Gao et al. 2024 to initialise the pre-encoder bias b_pre)."""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """The point minimising Σ_i ‖p_i − m‖ for ``points [N, d]`` (float64 internally)."""
    p = points.double()
    m = p.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (p - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * p).sum(0) / w.sum()
        if (m_new - m).norm() <= tol * max(1.0, m.norm().item()):
            m = m_new
            break
        m = m_new
    return m.to(points.dtype)
