"""Gated SAE (Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse autoencoders",
arXiv:2404.16014).

x' = x − b_dec; π_gate = x' W_enc + b_gate; π_mag = x' (W_enc ⊙ exp(r_mag)) + b_mag;
f = 1[π_gate > 0] ⊙ ReLU(π_mag). Parameter names follow SAELens (no b_enc).

Training loss (the paper's eq. 8): ‖x − x̂(f)‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖², where
x̂_frozen uses stop-gradient copies of W_dec and b_dec; decoder rows are kept at unit norm and dead
latents are resampled as in Bricken et al. 2023 (the paper's baseline practice). See docs/recipes/gated.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from saeforge.sae.base import ExportSpec, SAE, Codes, SAEConfig, StepState, TrainStepInput, register
from saeforge.sae.functional import BrickenResampling, TargetL0, set_dataset_scales_


# Adam β1. The paper trains with β = (0, 0.999) (PUBLISHED_BETAS; dictionary_learning's gdm trainer). Under the shared
# lr rule, stories260K 3M tokens target L0 32 (docs/recipes/gated.md): β1 = 0 gives FVU 0.0317 at L0 32.6 (1.15× TopK
# at that L0), 0.5 gives 0.0283 at L0 31.0 (1.00×; 1.6 % dead), 0.9 gives 0.0288 at L0 30.9 but leaves 29 % of the
# latents dead (they die in the dense start, and Bricken resampling's revived latents die again).
PUBLISHED_BETAS = (0.0, 0.999)
GATED_BETA1 = 0.5


@dataclass
class GatedConfig(SAEConfig):
    l1_coefficient: float = 1.0  # λ on ‖ReLU(π_gate)‖₁
    target_l0: float | None = None  # steer the coefficient to this mean L0 (TargetL0); None: fixed
    scale_inputs: bool = True  # E‖x‖ = √n before training (a fixed dataset scalar, as the paper)
    resample: bool = True  # Bricken et al. 2023 resampling, with their constants below
    resample_every_tokens: int | None = None  # None: 200M, or 1/8 of a shorter run (BrickenResampling)
    resample_window_tokens: int | None = None  # None: 100M, or half the period of a shorter run
    resample_max: int = 4
    resample_rows: int | None = None  # None: 819,200, or a quarter of a shorter period
    resample_encoder_scale: float = 0.2

    SPARSITY_FIELD: ClassVar[str] = "l1_coefficient"


@register("gated")
class GatedSAE(TargetL0, BrickenResampling, SAE):
    config_class = GatedConfig
    cfg: GatedConfig
    has_b_enc = False
    resample_biases = ("b_gate", "b_mag", "r_mag")

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

    def export_spec(self) -> ExportSpec:
        tensors = {"b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag}
        tensors = {k: v.detach().cpu().float() for k, v in tensors.items()}
        return ExportSpec("gated", tensors=tensors, encoder_biases=(("b_gate", None), ("b_mag", "r_mag")),
                          training=self.arch)

    # ---- training ---------------------------------------------------------------------------------
    def published_lr(self) -> float:
        return 5e-5

    def adam_defaults(self) -> dict:
        """Adam β = (GATED_BETA1, 0.999): the paper's β1 = 0 (dictionary_learning's ``ConstrainedAdam(betas=(0,
        0.999))``) is ``TrainConfig(betas=(0.0, 0.999))`` / ``--betas 0 0.999``; see GATED_BETA1."""
        return {"betas": (GATED_BETA1, PUBLISHED_BETAS[1])}

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        if self.cfg.scale_inputs:
            set_dataset_scales_(self, x, y)

    def before_optimizer_step(self) -> None:
        self.remove_parallel_decoder_grad()

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.set_decoder_norm_to_unit()

    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        pi_gate = self.gate_pre_acts(x)
        return Codes(f=(pi_gate > 0) * self.pre_acts(x).relu(), extra={"pi_gate": pi_gate})

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        """λ ‖ReLU(π_gate)‖₁ and the auxiliary reconstruction from the gate through a frozen decoder (eq. 8)."""
        gate = s.codes.extra["pi_gate"].relu()
        aux = (s.y - (gate @ self.W_dec.detach() + self.b_dec.detach())).pow(2).sum(-1).mean()
        return {"sparsity": (self.cfg.l1_coefficient, gate.sum(-1).mean()), "aux": (1.0, aux)}

    def folded(self) -> "GatedSAE":
        """Decoder norms folded into the magnitude path (r_mag += log n, b_mag *= n); the gate is unchanged."""
        out = copy.deepcopy(self)
        with torch.no_grad():
            n = out.W_dec.norm(dim=1).clamp_min(1e-12)
            out.W_dec.div_(n[:, None])
            out.r_mag.add_(n.log())
            out.b_mag.mul_(n)
        return out

    # ---- resampling hooks -------------------------------------------------------------------------
    def resampling_enabled(self) -> bool:
        return self.cfg.resample

    def reconstruct_working(self, x_n: Tensor) -> Tensor:
        f = (self.gate_pre_acts(x_n) > 0) * self.pre_acts(x_n).relu()
        return f @ self.W_dec + self.b_dec
