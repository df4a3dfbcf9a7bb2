"""ReLU SAE with an L1-style penalty (Anthropic, April 2024 update; Bricken et al. 2023 as a recipe option).

f = ReLU(W_enc x' + b_enc); x̂ = f W_dec + b_dec.  (Training recipe: see docs/recipes/relu.md.)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saeforge.sae.base import SAE, SAEConfig, register


@dataclass
class ReLUConfig(SAEConfig):
    pass


@register("relu")
class ReLUSAE(SAE):
    config_class = ReLUConfig

    def activate(self, h: Tensor) -> Tensor:
        return h.relu()
