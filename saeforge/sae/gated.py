"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse autoencoders").

x' = x − b_dec; π_gate = x' W_enc + b_gate; π_mag = x' (W_enc ⊙ exp(r_mag)) + b_mag;
f = 1[π_gate > 0] ⊙ ReLU(π_mag). Parameter names follow SAELens (no b_enc).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saeforge.sae.base import SAE, SAEConfig, register


@dataclass
class GatedConfig(SAEConfig):
    pass


@register("gated")
class GatedSAE(SAE):
    config_class = GatedConfig
    has_b_enc = False

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def _centered(self, x_n: Tensor) -> Tensor:
        return x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """The magnitude path's pre-activation (SAELens's ``hidden_pre``)."""
        return self._centered(x_n) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def gate_pre_acts(self, x_n: Tensor) -> Tensor:
        return self._centered(x_n) @ self.W_enc + self.b_gate

    def encode(self, x: Tensor) -> Tensor:
        x_n, self._norm_ctx = self.normalize_input(x)
        return (self.gate_pre_acts(x_n) > 0) * self.pre_acts(x_n).relu()

    def activate(self, h: Tensor) -> Tensor:  # only meaningful with the gate; see encode
        raise TypeError("GatedSAE needs the input for its gate; call encode(x)")
