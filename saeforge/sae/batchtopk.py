"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv:2412.06410).

Training keeps the top B·k ReLU'd pre-activations of the whole batch (so k active latents per row *on
average*). Inference needs no batch: one global threshold θ, f = h · 1[h > θ] after ReLU, where θ is
estimated during training as a running average of the smallest kept activation of each batch (the
paper's §3; the EMA form follows the reference code in dictionary_learning's ``BatchTopKTrainer``, whose
constants β = 0.999 and "start after step 1000" are meant for runs of tens of thousands of steps). θ is a
buffer, saved with the weights. By default both scale with the run: the EMA starts after min(1000, 10% of
the steps) and averages over about a tenth of the remaining steps (β = min(0.999, 1 − 10 / remaining)).
Setting ``threshold_start_step`` / ``threshold_beta`` gives the fixed published constants; a start beyond
the run is moved to its second-to-last step, so every run, short or long, saves an estimated threshold.

Everything else is Gao et al.'s TopK recipe: b_dec at the geometric median, W_enc = W_decᵀ at init,
unit-norm decoder rows with the parallel gradient removed, AuxK (α = 1/32, k_aux = d_in/2),
lr = 2e-4/√(m/2^14). See docs/recipes/batchtopk.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeforge import distributed as dist
from saeforge.distributed.ops import batch_topk_threshold, total_variance
from saeforge.errors import SaeforgeError
from saeforge.kernels.topk_autograd import batch_topk_encode
from saeforge.sae.base import ExportSpec, SAE, Codes, SAEConfig, StepState, TrainStepInput, register
from saeforge.sae.functional import auxk
from saeforge.sae.geometric_median import geometric_median


@dataclass
class BatchTopKConfig(SAEConfig):
    k: int = 32
    k_aux: int | None = None  # None: d_in // 2 (dictionary_learning's BatchTopK, after Gao et al. §A.2)
    aux_coef: float = 1 / 32
    threshold_beta: float | None = None  # EMA factor of θ; None: min(0.999, 1 − 10/steps after the start)
    threshold_start_step: int | None = None  # the EMA starts after this step; None: min(1000, 10% of steps)
    init_b_dec_geometric_median: bool = True

    SPARSITY_FIELD: ClassVar[str] = "k"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_finite("aux_coef", minimum=0.0)
        if not 0 < self.k <= self.d_sae:
            raise SaeforgeError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")
        if self.threshold_beta is not None and not 0 <= self.threshold_beta < 1:
            raise SaeforgeError(f"threshold_beta={self.threshold_beta} must be in [0, 1)")
        if self.k_aux is None:
            self.k_aux = max(1, min(self.d_sae, self.d_in // 2))


def batch_topk(h: Tensor, k: int) -> Tensor:
    """Keep the top (rows · k) ReLU'd values of the whole batch ``h [B, d_sae]``; zeros elsewhere."""
    flat = h.relu().flatten()
    n = min(flat.numel(), h.shape[0] * k)
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(h)


def global_batch_topk(h: Tensor, k: int, global_rows: int | None = None) -> Tensor:
    """:func:`batch_topk` over the global batch under data parallelism (the rows of every process of the
    data group; an exact threshold from one all-gather, :func:`~saeforge.distributed.ops.batch_topk_threshold`).
    With one process it is :func:`batch_topk`."""
    if not data_parallel():
        return batch_topk(h, k)
    v = h.relu()
    return v * (v >= batch_topk_threshold(v, k, global_rows))


def data_parallel() -> bool:
    return dist.active() and dist.data_group().size > 1


@register("batchtopk")
class BatchTopKSAE(SAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # global inference threshold; −1 means "not estimated yet" (dictionary_learning's convention)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activate(self, h: Tensor) -> Tensor:
        h = h.relu()
        return h * (h > self.threshold)

    def export_spec(self) -> ExportSpec:
        return ExportSpec("batchtopk", tensors={"threshold": self.threshold.detach().cpu().float().reshape(())},
                          k=self.cfg.k, training=self.arch)

    def published_lr(self) -> float:
        return 2e-4 / math.sqrt(self.cfg.d_sae / 2**14)

    def default_optimizer(self) -> str:
        """Schedule-free sign descent, as TopK (docs/recipes/batchtopk.md: far fewer dead latents than Adam)."""
        return "signum"

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        if self.cfg.init_b_dec_geometric_median and not self.cfg.is_transcoder:
            self.b_dec.copy_(geometric_median(self.normalize_input(x)[0].float()))

    def before_optimizer_step(self) -> None:
        self.remove_parallel_decoder_grad()

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.set_decoder_norm_to_unit()

    def threshold_schedule(self, total_steps: int) -> tuple[int, float]:
        """(start step, β) of the threshold EMA for a run of ``total_steps`` (see the module docstring)."""
        start = self.cfg.threshold_start_step
        if start is None:
            start = min(1000, total_steps // 10)
        start = min(start, total_steps - 2)  # starts within the run: a saved SAE never has θ unset
        beta = self.cfg.threshold_beta
        if beta is None:
            beta = min(0.999, max(0.0, 1 - 10 / max(1, total_steps - start)))
        return start, beta

    @torch.no_grad()
    def update_threshold(self, f: Tensor, step: int, total_steps: int | None = None) -> None:
        """θ ← β θ + (1 − β) min{f > 0} (the first estimate is taken as is). No host sync."""
        start, beta = self.threshold_schedule(total_steps or 10**12)
        if step <= start:
            return
        pos = f.float().masked_fill(f <= 0, float("inf")).amin()
        if data_parallel():  # the smallest kept value of the global batch
            pos = dist.all_reduce(pos.reshape(1).clone(), op="min", group=dist.data_group())[0]
        have = torch.isfinite(pos)
        new = torch.where(self.threshold < 0, pos, beta * self.threshold + (1 - beta) * pos)
        self.threshold.copy_(torch.where(have, new, self.threshold))

    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        """On CPU the sparse kernels (chunked exact batch top-k, sparse decode and gradients) unless
        ``self.sparse_kernels`` is False. Their exact selection reads one flag back from the device per
        step, so on GPUs the dense path (no host sync) is used. Same loss and gradients either way. The
        threshold estimate is updated from the kept values."""
        cfg = self.cfg
        if self.sparse_kernels and x.device.type == "cpu" and not data_parallel():
            x2 = x.reshape(-1, x.shape[-1])
            dead = inp.dead_mask if (inp.dead_mask is not None and cfg.aux_coef > 0) else None
            sel, _ = batch_topk_encode(x2, self.W_enc, self.b_enc, cfg.k,
                                       b_pre=self.b_dec if cfg.apply_b_dec_to_input else None,
                                       dead_mask=dead, k_aux=min(cfg.k_aux, cfg.d_sae))
            codes = Codes(vals=sel.vals, idx=sel.idx, selection=sel)
        else:
            h = self.pre_acts(x)
            codes = Codes(f=global_batch_topk(h, cfg.k, inp.global_rows), h=h)
        self.update_threshold(codes.vals if codes.sparse else codes.f, inp.step, inp.total_steps)
        return codes

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        if s.inp.dead_mask is None or self.cfg.aux_coef <= 0:
            return {}
        # the residual's variance, a constant as in dictionary_learning (which passes e.detach()); of the global
        # batch under data parallelism
        denom = total_variance(s.e.detach()).clamp_min(1e-12)
        return {"aux": (self.cfg.aux_coef, auxk(s, self.cfg.k_aux, self.W_dec, denom))}
