"""ReLU SAE with an L1-style penalty. Two published recipes (``recipe`` field; docs/recipes/relu.md):

``anthropic2024`` (Anthropic, Circuits Updates April 2024, "Update on how we train SAEs"):
    f = ReLU(W_e x + b_e), x̂ = W_d f + b_d, loss = ‖x − x̂‖² + λ Σ_i f_i ‖W_d,i‖, λ warmed up linearly
    from 0 over the first 5% of steps; no decoder-norm constraint; inputs scaled so E‖x‖ = √n;
    W_d rows random directions of norm 0.1, W_e = W_dᵀ, biases 0; decoder norms folded into the
    encoder when saved.
``monosemanticity`` (Bricken et al. 2023, "Towards Monosemanticity"):
    b_d subtracted before encoding (initialised to the geometric median), unit-norm decoder rows,
    plain L1 penalty, and dead-latent resampling (saeforge.sae.functional.bricken_resample_).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.sae.base import FREE_NORM_LR_SCALE, LR_SCALE, ExportSpec, SAE, SAEConfig, StepState, register
from saeforge.sae.functional import (
    TARGET_L0_START, BrickenResampling, TargetL0, fold_decoder_norms_, ramp, set_dataset_scales_,
)
from saeforge.sae.geometric_median import geometric_median

RECIPES = ("anthropic2024", "monosemanticity")
L1_DEFAULT = 5.0  # saeforge's λ on √n-scaled data (docs/recipes/relu.md)
# anthropic2024 with a target L0: λ starts at L1_TARGET_START·√(n_out / target_l0). On √n-scaled data each of the L0
# firing latents carries ≈ √(n/L0) of ‖x‖, so the penalty at the target is λ·√(n·L0) against a signal energy n: a
# fixed share of it needs λ ∝ √(n/L0). 0.35 is the start measured best on stories260K (≈ 0.5 at n = 64, target 32;
# docs/recipes/relu.md); monosemanticity (unscaled data) keeps L1_DEFAULT · TARGET_L0_START.
L1_TARGET_START = 0.35


@dataclass
class ReLUConfig(SAEConfig):
    apply_b_dec_to_input: bool | None = None  # None: the recipe's (anthropic2024 False, monosemanticity True)
    recipe: str = "anthropic2024"
    # λ; None: 5.0, or when target_l0 steers it L1_TARGET_START·√(n_out/target) (anthropic2024; 0.49 at n = 64,
    # target 32) or 0.5 (monosemanticity) (started at 5.0, the penalty's warm-up kills a quarter of the latents
    # before the controller can act; from 0.5 the code starts dense and L0 comes down to the target)
    l1_coefficient: float | None = None
    target_l0: float | None = None  # steer the coefficient to this mean L0 (TargetL0); None: fixed
    l1_warmup_frac: float | None = None  # None: the recipe's (anthropic2024 0.05, monosemanticity 0)
    decoder_init_norm: float = 0.1  # anthropic2024 only ("heuristic" init of the April update)
    scale_inputs: bool | None = None  # E‖x‖ = √n; None: the recipe's (anthropic2024 True, else False)
    # monosemanticity resampling (Bricken et al. 2023): at every 25,000 steps × 8,192 rows (at most 4
    # times) latents silent for the last 12,500 steps × 8,192 rows are reset from 819,200 inputs.
    resample_every_tokens: int | None = None  # None: 200M, or 1/8 of a shorter run (BrickenResampling)
    resample_window_tokens: int | None = None  # None: 100M, or half the period of a shorter run
    resample_max: int = 4
    resample_rows: int | None = None  # None: 819,200, or a quarter of a shorter period
    resample_encoder_scale: float = 0.2

    SPARSITY_FIELD: ClassVar[str] = "l1_coefficient"
    RECIPES: ClassVar[tuple[str, ...]] = RECIPES

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise SaeforgeError(f"relu recipe {self.recipe!r} is not known; use one of {', '.join(RECIPES)}")
        mono = self.recipe == "monosemanticity"
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = mono and (self.d_out is None or self.d_out == self.d_in)
        if self.l1_warmup_frac is None:
            self.l1_warmup_frac = 0.0 if mono else 0.05
        if self.scale_inputs is None:
            self.scale_inputs = not mono
        if self.l1_coefficient is None:
            n_out = self.d_out if self.d_out is not None else self.d_in
            if self.target_l0 is None:
                self.l1_coefficient = L1_DEFAULT
            elif mono or not self.target_l0 > 0:  # a bad target is refused by the base validation
                self.l1_coefficient = L1_DEFAULT * TARGET_L0_START
            else:
                self.l1_coefficient = L1_TARGET_START * math.sqrt(n_out / self.target_l0)
        super().__post_init__()


@register("relu")
class ReLUSAE(TargetL0, BrickenResampling, SAE):
    config_class = ReLUConfig
    cfg: ReLUConfig

    @property
    def _mono(self) -> bool:
        return self.cfg.recipe == "monosemanticity"

    def reset_parameters(self) -> None:
        super().reset_parameters()  # unit rows, W_enc = W_decᵀ (Bricken; Anthropic's transpose init)
        if not self._mono:
            with torch.no_grad():
                self.W_dec.mul_(self.cfg.decoder_init_norm)
                if self.cfg.d_out == self.cfg.d_in:
                    self.W_enc.copy_(self.W_dec.T)

    def activate(self, h: Tensor) -> Tensor:
        return h.relu()

    def export_spec(self) -> ExportSpec:
        return ExportSpec("relu", training=self.arch)

    def published_lr(self) -> float:
        return 2e-4 if self._mono else 5e-5  # April 2024 update: lr 5e-5

    def adam_lr_scale(self) -> float:
        """anthropic2024 (no decoder-norm constraint) steered to a target L0: FREE_NORM_LR_SCALE, measured; with a
        fixed λ the larger lr only kills latents faster, so LR_SCALE (docs/recipes/relu.md)."""
        return FREE_NORM_LR_SCALE if not self._mono and self.cfg.target_l0 is not None else LR_SCALE

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        if self.cfg.scale_inputs:
            set_dataset_scales_(self, x, y)
        if self._mono and not self.cfg.is_transcoder:
            self.b_dec.copy_(geometric_median(self.normalize_input(x)[0].float()))

    def before_optimizer_step(self) -> None:
        if self._mono:
            self.remove_parallel_decoder_grad()

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self._mono:
            self.set_decoder_norm_to_unit()

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        """λ Σ_i f_i ‖W_d,i‖ (anthropic2024) or λ Σ_i f_i (monosemanticity, unit-norm decoder rows)."""
        weights = 1.0 if self._mono else self.W_dec.norm(dim=1)
        sparsity = (s.codes.f * weights).sum(-1).mean()
        return {"sparsity": (self.cfg.l1_coefficient * self.sparsity_ramp(s.inp.step, s.inp.total_steps), sparsity)}

    def sparsity_ramp(self, step: int, total_steps: int) -> float:
        return ramp(step, self.cfg.l1_warmup_frac * total_steps)

    def folded(self) -> "ReLUSAE":
        """Decoder norms folded into W_e and b_e (April 2024: the saved decoder has unit rows)."""
        out = copy.deepcopy(self)
        fold_decoder_norms_(out, out.W_dec.norm(dim=1))
        return out

    # ---- Bricken et al. 2023 resampling (trainer hooks from BrickenResampling) -------------------
    def resampling_enabled(self) -> bool:
        return self._mono

    def reconstruct_working(self, x_n: Tensor) -> Tensor:
        return self.pre_acts(x_n).relu() @ self.W_dec + self.b_dec
