"""JumpReLU SAE: f_i = h_i · 1[h_i > θ_i], h = W_enc x' + b_enc, θ_i = exp(log_threshold_i) > 0 (strict
``>``, as every peer library). Two published recipes (``recipe`` field; docs/recipes/jumprelu.md):

``anthropic2025`` (Anthropic, Circuits Updates January 2025, "Dictionary learning optimization techniques"):
    straight-through gradients ∂f/∂h = 1[h > e^t], ∂f/∂t = −e^t/ε on |h − e^t| < ε/2 (ε = 2) that reach
    every parameter; loss = ‖y − ŷ‖² + λ_S Σ tanh(c |f_i| ‖W_d,i‖) + λ_P Σ ReLU(e^t_i − h_i) ‖W_d,i‖,
    c = 4, λ_P = 3e-6 (below 2^20 latents scaled by 2^20/m, capped at 2^8; ``pre_act_rule``), λ_S ramped
    linearly from 0 over all of training (with a target L0: steered, from 0.1·n_out/target); W_d ~ U(±1/√n),
    W_e = (n/m) W_dᵀ, b_d = 0, t = 0.1 (log threshold), b_e set so each latent fires on 10000/m of a
    data sample; E‖x‖ = √n; Adam (0.9, 0.999), lr 2e-4; decoder norms folded when saved.
``gemmascope`` (Rajamanoharan et al. 2024b, arXiv:2407.14435; Lieberum et al. 2024, Gemma Scope):
    L0 penalty through a step function whose pseudo-gradient trains only θ, ε = 0.001, θ₀ = 0.001,
    unit-norm decoder rows, Adam (0, 0.999), lr 7e-5.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.kernels import topk_autograd
from saeforge.sae.base import (
    FREE_NORM_LR_SCALE, LR_SCALE, ExportSpec, SAE, Codes, SAEConfig, StepState, TrainStepInput, register,
)
from saeforge.sae.functional import (
    TARGET_L0_START, TargetL0, fold_decoder_norms_, jumprelu, jumprelu_log, ramp, set_dataset_scales_, step,
)

RECIPES = ("anthropic2025", "gemmascope")
_DEFAULTS = {  # recipe -> (sparsity coefficient, bandwidth ε, initial log threshold)
    "anthropic2025": (20.0, 2.0, 0.1),
    "gemmascope": (1.0, 0.001, math.log(0.001)),
}
# λ_P (anthropic2025). The update's 3e-6 (``pre_act_rule="published"``) is kept for m >= 2^20 latents; smaller
# dictionaries get 3e-6·2^20/m (``"scaled"``, the default): a latent's reconstruction gradient scales with its
# firing rate L0/m, its pre-activation gradient does not, so λ_P·m is what keeps their balance; the factor is
# capped at 2^8 (7.68e-4 for m <= 4,096). The cap was 2^10 (3.07e-3) until the eighth session; with the 4x lr of a
# target-L0 run, stories260K (m = 1,024, 3M tokens, target 32) gave FVU ÷ TopK at the same L0 of 1.38 / 1.28 / 1.09
# / 1.01 at λ_P = 3.07e-3 / 1.54e-3 / 1.0e-3 / 7.68e-4, and collapsed at 3e-4 (L0 13.5) (docs/recipes/jumprelu.md,
# "Small dictionaries").
PUBLISHED_PRE_ACT = 3e-6
PRE_ACT_REF_LATENTS = 2 ** 20
PRE_ACT_MAX_SCALE = 2 ** 8
PRE_ACT_RULES = ("scaled", "published")
# anthropic2025 with a target L0: λ_S starts where the tanh penalty of the target L0 (≈ λ_S per firing latent)
# is this fraction of the signal energy E‖y‖² ≈ n_out: λ_S₀ = 0.1·n_out / target_l0 (measured, docs)
TARGET_L0_ENERGY = 0.1


@dataclass
class JumpReLUConfig(SAEConfig):
    apply_b_dec_to_input: bool = False
    recipe: str = "anthropic2025"
    sparsity_coefficient: float | None = None  # λ_S (anthropic2025: 20) or the L0 coefficient (gemmascope: 1)
    target_l0: float | None = None  # steer the coefficient to this mean L0 (TargetL0); None: fixed
    bandwidth: float | None = None  # ε; None: the recipe's (2 or 0.001)
    init_log_threshold: float | None = None  # t₀; None: the recipe's (0.1, or log 0.001)
    tanh_scale: float = 4.0  # c (anthropic2025)
    # λ_P (anthropic2025); None: by ``pre_act_rule``, "scaled" (3e-6·clamp(2^20/m, 1, 2^8)) or "published" (3e-6)
    pre_act_coefficient: float | None = None
    pre_act_rule: str = "scaled"
    # anthropic2025: b_e makes each latent fire on init_fire_count / m of inputs. None: the paper's 10,000, capped
    # at a tenth of the latents (10000/m is a rate only for m >= 10^5; below that every latent fired on every
    # input and λ_S then killed half of them, docs/recipes/jumprelu.md)
    init_fire_count: float | None = None
    sparsity_warmup_steps: int | None = None  # gemmascope λ warm-up; None: 10,000 steps, or 10% of a shorter run
    scale_inputs: bool = True  # E‖x‖ = √n before training

    SPARSITY_FIELD: ClassVar[str] = "sparsity_coefficient"
    RECIPES: ClassVar[tuple[str, ...]] = RECIPES

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise SaeforgeError(f"jumprelu recipe {self.recipe!r} is not known; use one of {', '.join(RECIPES)}")
        lam, eps, t0 = _DEFAULTS[self.recipe]
        self.require(self.pre_act_rule in PRE_ACT_RULES, "pre_act_rule", " or ".join(PRE_ACT_RULES))
        if self.pre_act_coefficient is None:
            scale = 1.0 if self.pre_act_rule == "published" else \
                min(PRE_ACT_MAX_SCALE, max(1.0, PRE_ACT_REF_LATENTS / max(1, self.d_sae)))
            self.pre_act_coefficient = PUBLISHED_PRE_ACT * scale
        if self.sparsity_coefficient is None:
            if self.target_l0 is None:
                self.sparsity_coefficient = lam
            elif self.recipe == "anthropic2025" and self.target_l0 > 0:
                # the controller starts near where it settles, from the dense side (docs/recipes/jumprelu.md)
                n_out = self.d_out if self.d_out is not None else self.d_in
                self.sparsity_coefficient = TARGET_L0_ENERGY * n_out / self.target_l0
            else:  # gemmascope: from a tenth of the fixed default (TARGET_L0_START)
                self.sparsity_coefficient = lam * TARGET_L0_START
        self.bandwidth = eps if self.bandwidth is None else self.bandwidth
        self.init_log_threshold = t0 if self.init_log_threshold is None else self.init_log_threshold
        self.require_finite("bandwidth", positive=True)
        self.require_finite("pre_act_coefficient", "sparsity_coefficient", minimum=0.0)
        super().__post_init__()


@register("jumprelu")
class JumpReLUSAE(TargetL0, SAE):
    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.init_log_threshold)))

    @property
    def _anthropic(self) -> bool:
        return self.cfg.recipe == "anthropic2025"

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activate(self, h: Tensor) -> Tensor:
        return h.relu() * (h > self.threshold)

    # read checkpoints train on with the threshold-only recipe Gemma Scope, SAELens and dictionary_learning use
    IMPORT_DEFAULTS: ClassVar[dict[str, object]] = {"recipe": "gemmascope"}

    def export_spec(self) -> ExportSpec:
        threshold = self.log_threshold.detach().cpu().double().exp().float()  # float64 exp, as formats read it
        return ExportSpec("jumprelu", tensors={"threshold": threshold}, training=self.arch)

    # ---- initialisation ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        if not self._anthropic:
            return super().reset_parameters()  # unit rows, W_enc = W_decᵀ, zero biases
        n, m = self.cfg.d_in, self.cfg.d_sae
        with torch.no_grad():
            nn.init.uniform_(self.W_dec, -1 / math.sqrt(n), 1 / math.sqrt(n))
            if self.cfg.d_out == n and not self.cfg.is_transcoder:
                self.W_enc.copy_((n / m) * self.W_dec.T)
            else:
                # drawn in [d_in, d_sae] order: the same numbers whatever W_enc's storage layout
                self.W_enc.copy_(torch.empty(self.W_enc.shape).uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m)))

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        if self.cfg.scale_inputs:
            set_dataset_scales_(self, x, y)
        if self._anthropic:
            count = self.cfg.init_fire_count
            count = min(10000.0, 0.1 * self.cfg.d_sae) if count is None else count
            self.b_enc.copy_(self.fire_rate_bias(x, count / self.cfg.d_sae))

    @torch.no_grad()
    def fire_rate_bias(self, x: Tensor, rate: float) -> Tensor:
        """b_e such that h_i = (W_e x)_i + b_e,i exceeds e^t_i on a fraction ``rate`` of the rows of x."""
        x_n = self.normalize_input(x)[0]
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        h = (x_n @ self.W_enc).float()
        N = h.shape[0]
        above = min(N, max(0, round(min(1.0, rate) * N)))
        if above >= N:  # every row fires: put the threshold just below the smallest value
            v = h.min(0).values - 1e-6 * (1 + h.abs().max(0).values)
        else:
            v = h.kthvalue(N - above, dim=0).values
        return (self.threshold.float() - v).to(self.b_enc.dtype)

    # ---- training ---------------------------------------------------------------------------------
    def published_lr(self) -> float:
        return 2e-4 if self._anthropic else 7e-5

    def adam_lr_scale(self) -> float:
        """anthropic2025 (no decoder-norm constraint) steered to a target L0: FREE_NORM_LR_SCALE, measured
        (docs/recipes/jumprelu.md); otherwise LR_SCALE."""
        return FREE_NORM_LR_SCALE if self._anthropic and self.cfg.target_l0 is not None else LR_SCALE

    def adam_defaults(self) -> dict:
        return {"betas": (0.9, 0.999)} if self._anthropic else {"betas": (0.0, 0.999), "eps": 1e-8}

    def before_optimizer_step(self) -> None:
        if not self._anthropic:
            self.remove_parallel_decoder_grad()

    def after_optimizer_step(self, step_: int, total_steps: int) -> None:
        if not self._anthropic:
            self.set_decoder_norm_to_unit()

    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        h = self.pre_acts(x)
        if self._anthropic:
            return Codes(f=jumprelu_log(h, self.log_threshold, self.cfg.bandwidth), h=h)
        return Codes(f=jumprelu(h, self.threshold, self.cfg.bandwidth), h=h)

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        """anthropic2025: λ_S Σ tanh(c |f_i| ‖W_d,i‖) + λ_P Σ ReLU(e^t_i − h_i) ‖W_d,i‖; gemmascope: λ L0
        through the step function (its pseudo-gradient trains only θ)."""
        cfg, h = self.cfg, s.codes.h
        lam = cfg.sparsity_coefficient * self.sparsity_ramp(s.inp.step, s.inp.total_steps)
        if self._anthropic:
            dn = self.W_dec.norm(dim=1)
            sparsity = torch.tanh(cfg.tanh_scale * s.codes.f.abs() * dn).sum(-1).mean()
            pre_act = ((self.threshold - h).relu() * dn).sum(-1).mean()
            return {"sparsity": (lam, sparsity), "pre_act": (cfg.pre_act_coefficient, pre_act)}
        return {"l0_loss": (lam, step(h, self.threshold, cfg.bandwidth).sum(-1).mean())}

    def sparsity_ramp(self, step: int, total_steps: int) -> float:
        """anthropic2025: λ_S ramps linearly over all of training, or over its first 5% when a target L0
        steers it (the controller needs a fixed ramp to act on); gemmascope: over ``sparsity_warmup_steps``
        (default 10,000, or a tenth of a shorter run)."""
        if self._anthropic:
            return ramp(step, total_steps if self.cfg.target_l0 is None else 0.05 * total_steps)
        warm = self.cfg.sparsity_warmup_steps
        return ramp(step, min(10_000, total_steps // 10) if warm is None else warm)

    def training_decode(self, codes: Codes) -> Tensor:
        """``f @ W_dec + b_dec``; on CPU with ``sparse_kernels``, once the codes are sparse (the busiest row
        has at most 1/8 of the latents active), as a gather-sum of the active decoder rows whose backward
        touches only those rows (the straight-through estimators stay on the dense encoder side). Counting
        the active latents is a host read, which costs nothing on CPU; GPUs keep the dense product. While codes
        are still dense the O(B·m) count is wasted, next to the O(B·m·d) product it decides against."""
        f = codes.f
        if self.sparse_kernels and f.device.type == "cpu" and f.dim() == 2:
            vals, idx = topk_autograd.dense_to_sparse(f)  # width = the busiest row's count
            if idx.shape[-1] * 8 <= f.shape[-1]:
                return topk_autograd.sparse_decode(vals, idx, self.W_dec, self.b_dec)
        return f @ self.W_dec + self.b_dec

    def folded(self) -> "JumpReLUSAE":
        """Decoder norms folded into W_e, b_e and the threshold (θ' = θ·‖W_d,i‖; January 2025 update)."""
        out = copy.deepcopy(self)
        norms = out.W_dec.norm(dim=1).clamp_min(1e-12)
        with torch.no_grad():
            fold_decoder_norms_(out, norms)
            out.log_threshold.add_(norms.log())
        return out
