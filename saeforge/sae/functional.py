"""Pieces shared by the training recipes: straight-through estimators, dataset scaling, schedules,
the AuxK loss, decoder-norm folding and Bricken et al.'s dead-latent resampling.

Each function carries the formula and the source it implements; docs/recipes/*.md cite them in turn.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from saeforge.kernels.sparse_losses import sparse_auxk_loss
from saeforge.kernels.topk_autograd import sparse_decode


# ---- straight-through estimators ------------------------------------------------------------------
def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2] (Rajamanoharan et al. 2024b, eq. 11)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = h · 1[h > θ] with the straight-through pseudo-derivatives ∂f/∂h = 1[h > θ] and
    ∂f/∂p = −(θ/ε) K((h − θ)/ε) for the threshold parameter p handed in (K: the rectangle kernel).

    * ``log_param=False``: p = θ (Rajamanoharan et al. 2024b, Gemma Scope, eq. 11). When θ is itself
      exp(log θ), autograd chains through the exp.
    * ``log_param=True``: p = t with θ = e^t, and the derivative is taken with respect to t itself (not
      chained through exp), exactly as Anthropic's January 2025 update writes it.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, p: Tensor, eps: float, log_param: bool) -> Tensor:
        theta = p.exp() if log_param else p
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_h = g * (h > theta).to(g.dtype)
        grad_p = (-(theta / eps) * rectangle((h - theta) / eps) * g).reshape(-1, theta.shape[-1]).sum(0)
        return grad_h, grad_p, None, None


class _Step(torch.autograd.Function):
    """Heaviside step H(h − θ) with the pseudo-derivative ∂H/∂θ = −(1/ε) K((h − θ)/ε) and no gradient
    to h (Rajamanoharan et al. 2024b, eq. 12): the L0 penalty trains only the threshold."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (-(1.0 / eps) * rectangle((h - theta) / eps) * g).reshape(-1, theta.shape[-1]).sum(0)
        return torch.zeros_like(h), grad_theta, None


def jumprelu_log(h: Tensor, log_threshold: Tensor, eps: float) -> Tensor:
    return _JumpReLU.apply(h, log_threshold, eps, True)


def jumprelu(h: Tensor, threshold: Tensor, eps: float) -> Tensor:
    return _JumpReLU.apply(h, threshold, eps, False)


def step(h: Tensor, threshold: Tensor, eps: float) -> Tensor:
    return _Step.apply(h, threshold, eps)


# ---- data scaling and schedules -------------------------------------------------------------------
@torch.no_grad()
def norm_scale(x: Tensor, width: int | None = None) -> float:
    """The scalar s with E‖s·x‖ = √n over the sample ``x [N, n]`` (Anthropic, April 2024 and January
    2025 updates: "the dataset is scaled by a single constant such that E‖x‖ = √n")."""
    n = width if width is not None else x.shape[-1]
    mean_norm = x.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        return 1.0
    return math.sqrt(n) / mean_norm


def ramp(step_: int, total: float) -> float:
    """Linear ramp 0 → 1 over ``total`` steps, then 1 (λ warm-ups)."""
    if total <= 0:
        return 1.0
    return min(1.0, step_ / total)


# ---- AuxK (Gao et al. 2024, §A.2) -----------------------------------------------------------------
def auxk_loss(h: Tensor, e: Tensor, dead: Tensor, k_aux: int, W_dec: Tensor, denom: Tensor) -> Tensor:
    """‖e − ê‖² / denom, ê decoded (no bias) from the top-``k_aux`` dead latents of pre-activations ``h``.

    No host sync: live latents are masked to −inf, so rows pick zeros (after ReLU) when fewer latents are
    dead; the loss is forced to 0 when no latent is dead.
    """
    k = min(k_aux, h.shape[-1])
    av, ai = h.masked_fill(~dead, float("-inf")).topk(k, dim=-1, sorted=False)
    e_hat = sparse_decode(av.relu(), ai, W_dec, None)
    aux = (e_hat - e.detach()).pow(2).sum() / denom
    return torch.where(dead.any(), aux, torch.zeros_like(aux))


def auxk(s: Any, k_aux: int, W_dec: Tensor, denom: Tensor) -> Tensor:
    """AuxK of one training step (a :class:`saeforge.sae.base.StepState`): from the sparse kernels' AuxK
    candidates when the codes came from them, else from the dense pre-activations (:func:`auxk_loss`)."""
    dead = s.inp.dead_mask
    if s.codes.selection is not None:
        return sparse_auxk_loss(s.codes.selection, s.e, dead, W_dec, denom)
    return auxk_loss(s.codes.h, s.e, dead, k_aux, W_dec, denom)


# ---- folding --------------------------------------------------------------------------------------
@torch.no_grad()
def fold_decoder_norms_(sae: Any, norms: Tensor, encoder_cols: bool = True) -> None:
    """Rescale latent i by n_i: W_dec[i] /= n_i, and (when ``encoder_cols``) W_enc[:, i], b_enc[i] *= n_i.
    Codes scale by n_i, so f·W_dec is unchanged and so is which latents fire (for ReLU-like
    activations, positive homogeneity). Architectures with thresholds scale those too."""
    n = norms.clamp_min(1e-12)
    sae.W_dec.div_(n.view(-1, *([1] * (sae.W_dec.dim() - 1))))
    if encoder_cols:
        sae.W_enc.mul_(n)
        if getattr(sae, "b_enc", None) is not None:
            sae.b_enc.mul_(n)


# ---- dead-latent resampling (Bricken et al. 2023, "Neuron resampling") ----------------------------
@torch.no_grad()
def reset_optimizer_rows_(opt: torch.optim.Optimizer, param: Tensor, index: Tensor, dim: int) -> None:
    """Forget the optimizer's memory of the slices ``index`` of ``param`` along ``dim`` (a resampled latent
    starts fresh): Adam's moments become zero; schedule-free's ``z`` (saeforge.train.optim) takes the new
    value, so that its average and interpolation points equal it there too."""
    state = opt.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index, 0.0)
    if "z" in state:
        state["z"].index_copy_(dim, index, param.detach().index_select(dim, index))


@torch.no_grad()
def sample_by_loss(loss: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` distinct rows drawn with probability ∝ loss² (Bricken et al. 2023)."""
    p = loss.detach().double().cpu().pow(2)
    if not torch.isfinite(p).all() or p.sum() <= 0:
        p = torch.ones_like(p)
    n = min(n, int((p > 0).sum()))
    return torch.multinomial(p / p.sum(), n, replacement=False, generator=generator).to(loss.device)


@torch.no_grad()
def bricken_resample_(
    sae: Any, x_enc: Tensor, y_dec: Tensor, loss: Tensor, dead_idx: Tensor, opt: torch.optim.Optimizer,
    generator: torch.Generator, enc_scale: float = 0.2, zero: tuple[str, ...] = ("b_enc",),
) -> Tensor:
    """Bricken et al. 2023, "Neuron resampling", for the latents ``dead_idx``:

    1. draw one input per dead latent with probability ∝ (its reconstruction loss)²;
    2. decoder row := that input (target side for a transcoder) scaled to unit norm;
    3. encoder column := the input scaled to ``enc_scale`` (0.2) × the mean encoder norm of the live
       latents; the latent's encoder bias(es) := 0;
    4. Adam's moments of every modified row/column are reset to zero.

    Returns the indices actually reset (fewer than asked when the sample has too few rows).
    """
    pick = sample_by_loss(loss, int(dead_idx.numel()), generator)
    idx = dead_idx[: pick.numel()]
    if idx.numel() == 0:
        return idx
    v = x_enc[pick].float()
    u = y_dec[pick].float()
    alive = torch.ones(sae.W_enc.shape[1], dtype=torch.bool, device=idx.device)
    alive[idx] = False
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sae.W_enc.new_tensor(1.0)
    sae.W_enc[:, idx] = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * enc_norm * enc_scale).T.to(sae.W_enc.dtype)
    sae.W_dec[idx] = (u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(sae.W_dec.dtype)
    reset_optimizer_rows_(opt, sae.W_enc, idx, 1)
    reset_optimizer_rows_(opt, sae.W_dec, idx, 0)
    for name in zero:
        b = getattr(sae, name)
        b[idx] = 0.0
        reset_optimizer_rows_(opt, b, idx, 0)
    return idx


@torch.no_grad()
def set_dataset_scales_(sae: Any, x: Tensor, y: Tensor) -> None:
    """Set ``cfg.input_scale`` (and ``output_scale``) so that E‖x‖ = √n in the SAE's working space."""
    cfg = sae.cfg
    cfg.input_scale, cfg.output_scale = 1.0, 1.0
    cfg.input_scale = norm_scale(sae.normalize_input(x)[0])
    cfg.output_scale = norm_scale(y) if cfg.is_transcoder else cfg.input_scale


class BrickenResampling:
    """Mixin giving an SAE the trainer's resampling hooks (Bricken et al. 2023). The config needs the
    fields ``resample_every_tokens``, ``resample_window_tokens``, ``resample_max``, ``resample_rows``,
    ``resample_encoder_scale``; the class sets ``resample_biases`` (parameters zeroed for reset latents)
    and defines ``resampling_enabled`` and ``reconstruct_working(x_n) -> ŷ``."""

    resample_biases: tuple[str, ...] = ("b_enc",)
    _resample_window: int | None = None  # the window of the last due request (resample_schedule)

    def resampling_enabled(self) -> bool:
        return True

    def resample_schedule(self, total_tokens: int) -> tuple[int, int, int]:
        """(every, window, rows) in tokens: the configured values, or Bricken et al.'s (every 200M tokens, a
        100M window, 819,200 rows) shrunk to the run: at most every eighth of it, so that the ``resample_max``
        resamplings happen in the first half of any run, with a window of half the period."""
        cfg = self.cfg
        every = cfg.resample_every_tokens
        if every is None:
            every = max(1, min(200_000_000, total_tokens // (2 * max(1, cfg.resample_max))))
        window = cfg.resample_window_tokens if cfg.resample_window_tokens is not None else max(1, every // 2)
        rows = cfg.resample_rows if cfg.resample_rows is not None else max(1, min(819_200, every // 4))
        return every, window, rows

    def resample_request(self, tokens_before: int, tokens_after: int, total_tokens: int = 0) -> int:
        """Rows of data the trainer should hand to :meth:`resample` after this step (0: none)."""
        cfg = self.cfg
        every, self._resample_window, rows = self.resample_schedule(total_tokens)
        if not self.resampling_enabled() or every <= 0 or cfg.resample_max <= 0:
            return 0
        k = tokens_after // every
        due = k > tokens_before // every and k <= cfg.resample_max
        return rows if due else 0

    @torch.no_grad()
    def resample(self, x: Tensor, y: Tensor, since_fired: Tensor, opt: torch.optim.Optimizer,
                 generator: torch.Generator) -> Tensor:
        """Reset latents silent for ``resample_window_tokens``; returns the indices reset."""
        window = self._resample_window if self._resample_window is not None else self.cfg.resample_window_tokens
        dead = (since_fired >= window).nonzero().squeeze(1)
        if dead.numel() == 0:
            return dead
        x_n, _ = self.normalize_input(x)
        y_n = x_n if y is x else self.normalize_target(y)
        loss = (y_n - self.reconstruct_working(x_n)).pow(2).sum(-1)
        return bricken_resample_(self, x_n, y_n, loss, dead, opt, generator, self.cfg.resample_encoder_scale,
                                 self.resample_biases)


# With a target L0, the L1-family coefficients start at this fraction of their fixed default (ReLU, crosscoder):
# measured on stories260K (1M tokens, target 32): from 5.0, L0 5.4 with 25.8 % dead latents; from 0.5, L0 29.7 and
# none dead (FVU 0.060, TopK's 0.060); from 0.05 the controller had not come down to the target by the end.
TARGET_L0_START = 0.1


class TargetL0:
    """Mixin for the penalty architectures: with ``cfg.target_l0`` set, the sparsity coefficient
    (``cfg.SPARSITY_FIELD``) is steered to the L0 the user asked for instead of being a fixed input.

    At every metrics line (the loop's one host sync) the coefficient is multiplied by
    ``(L0 / target) ** L0_GAIN``, clipped to [3/4, 4/3]: integral control in log space, so the coefficient
    settles where the mean L0 of the batches equals the target, whatever the data's scale. The value in
    use is logged and saved in ``cfg.json``, so the run can be repeated with a fixed coefficient."""

    L0_GAIN = 0.6  # 0.3 settled 4–5 under a target of 32 in 733 steps (stories; docs/recipes/README.md)
    L0_STEP = 4 / 3  # the most one metrics line may change the coefficient by (either way)

    def sparsity_ramp(self, step: int, total_steps: int) -> float:
        """The recipe's warm-up factor (0 → 1) on the coefficient at ``step``; 1 when it has none."""
        return 1.0

    def after_metrics(self, metrics: dict[str, float], step: int, total_steps: int) -> None:
        cfg = self.cfg
        field_ = cfg.SPARSITY_FIELD
        # steer only once the recipe's warm-up is over: during it L0 is high by design. The line's L0 averages the
        # steps since the previous line, so a window that began in the warm-up only records its error (for the
        # anti-windup below) and does not steer: it still carries the dense start's L0
        steering = cfg.target_l0 is not None and metrics.get("l0") is not None
        window_start = cfg.metadata.get("target_l0_step", 0)
        if steering:
            cfg.metadata["target_l0_step"] = step
        if steering and self.sparsity_ramp(step, total_steps) >= 1:
            error = math.log(max(metrics["l0"], 1e-3) / cfg.target_l0)  # log(L0 / target)
            prev = cfg.metadata.get("target_l0_error")  # in the config, so a resumed run steers the same
            cfg.metadata["target_l0_error"] = error
            # anti-windup: while L0 is already closing in on the target (error down by a tenth since the
            # last line), hold the coefficient; L0 lags the coefficient by tens of steps
            whole_window = self.sparsity_ramp(window_start, total_steps) >= 1
            if whole_window and (prev is None or abs(error) >= 0.9 * abs(prev)):
                factor = min(self.L0_STEP, max(1 / self.L0_STEP, math.exp(self.L0_GAIN * error)))
                setattr(cfg, field_, getattr(cfg, field_) * factor)
        metrics[field_] = getattr(cfg, field_)
