"""JumpReLU SAE (Rajamanoharan et al. 2024; Anthropic's January 2025 recipe; Gemma Scope).

f_i = h_i · 1[h_i > θ_i] with h = W_enc x' + b_enc and θ_i = exp(log_threshold_i) > 0 (strict ``>``,
as every peer library). The threshold is stored as its logarithm, the parameter Anthropic's recipe trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saeforge.sae.base import SAE, SAEConfig, register


@dataclass
class JumpReLUConfig(SAEConfig):
    apply_b_dec_to_input: bool = False


@register("jumprelu")
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), -2.302585))  # θ = 0.1

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activate(self, h: Tensor) -> Tensor:
        return h.relu() * (h > self.threshold)
