"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): top B·k pre-activations over the whole batch while training;
at inference one global threshold θ (estimated during training and saved), f = h · 1[h > θ] after ReLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.sae.base import SAE, SAEConfig, register


@dataclass
class BatchTopKConfig(SAEConfig):
    k: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise SaeforgeError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")


def batch_topk(h: Tensor, k: int) -> Tensor:
    """Keep the top (rows · k) ReLU'd values of the whole batch ``h [B, d_sae]``; zeros elsewhere."""
    flat = h.relu().flatten()
    n = min(flat.numel(), h.shape[0] * k)
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(h)


@register("batchtopk")
class BatchTopKSAE(SAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))  # global inference threshold

    def activate(self, h: Tensor) -> Tensor:
        h = h.relu()
        return h * (h > self.threshold)
