"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093).

z = TopK(W_enc (x − b_pre) + b_enc) with ReLU on the kept values; x̂ = W_dec z + b_pre.
Recipe constants (each from the paper, §2 and Appendix A; see docs/recipes/topk.md):

* b_pre initialised to the geometric median of a data sample (§A.1, following Bricken et al. 2023);
* encoder initialised to the transpose of the decoder (§A.1);
* decoder rows kept at unit norm, with the gradient component parallel to them removed (§A.1);
* loss = normalised MSE (‖e‖² over the batch variance) + α · AuxK, α = 1/32, k_aux a power of two near
  d_in/2 (512 for GPT-2's 768), a latent is dead after 10M tokens without firing (§A.2). **Default changed:**
  α = 1/16 (eleventh session, measured with the default sign descent; ``aux_coef=1/32`` is the paper's);
* Multi-TopK (§A.3, optional): L(k) + L(4k)/8;
* Adam ε = 6.25e-10, lr = 2e-4 / sqrt(n / 2^14) for n latents (§A.4; sparsify uses the same scaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saeforge.distributed.ops import total_variance
from saeforge.errors import SaeforgeError
from saeforge.kernels.topk_autograd import sparse_decode, topk_encode
from saeforge.sae.base import ExportSpec, SAE, Codes, SAEConfig, StepState, TrainStepInput, register
from saeforge.sae.functional import auxk
from saeforge.sae.geometric_median import geometric_median


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    k_aux: int | None = None  # None: the power of two nearest d_in / 2 (Gao et al. §A.2)
    # AuxK's α: Gao et al.'s 1/32 doubled (eleventh session, docs/recipes/topk.md: with sign descent's r = 3 it
    # keeps the toy set's surplus latents alive, 0.78 % dead at 10M tokens against 1.07 %, and recovery over 99 %)
    aux_coef: float = 1 / 16
    multi_topk: bool = False  # add L(4k)/8 (Gao et al. §A.3)
    init_b_dec_geometric_median: bool = True

    SPARSITY_FIELD: ClassVar[str] = "k"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_finite("aux_coef", minimum=0.0)
        if not 0 < self.k <= self.d_sae:
            raise SaeforgeError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")
        if self.k_aux is None:
            self.k_aux = min(self.d_sae, 2 ** round(math.log2(max(self.d_in / 2, 1))))


def topk_relu(h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, ReLU on the kept values: (values [.., k], indices [.., k])."""
    vals, idx = h.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    cfg: TopKConfig
    # r = 3 (iterate k weighs (k+1)³) with AuxK α = 1/16: toy recovery at 10M tokens about 98.8 % over three seeds
    # (the best measured; twelfth session), MiniLM and stories a little better than at the shared r = 2
    # (docs/recipes/README.md, "Eleventh session" and "Twelfth session")
    signum_average_power: ClassVar[float | None] = 3.0

    def activate(self, h: Tensor) -> Tensor:
        vals, idx = topk_relu(h, self.cfg.k)
        return torch.zeros_like(h).scatter_(-1, idx, vals)

    def export_spec(self) -> ExportSpec:
        return ExportSpec("topk", k=self.cfg.k, training=self.arch, details={"multi_topk": self.cfg.multi_topk})

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_n, self._norm_ctx = self.normalize_input(x)
        return topk_relu(self.pre_acts(x_n), self.cfg.k)

    def published_lr(self) -> float:
        return 2e-4 / math.sqrt(self.cfg.d_sae / 2**14)

    def default_optimizer(self) -> str:
        """Schedule-free sign descent, as sparsify (a deviation from Gao et al.'s Adam, kept because it measured
        better at every budget we tried: docs/recipes/topk.md); ``TrainConfig.optimizer="adam"`` is the paper's."""
        return "signum"

    def adam_defaults(self) -> dict:
        """Gao et al. §A.4: Adam ε = 6.25e-10 (used when TrainConfig leaves betas/eps unset)."""
        return {"betas": (0.9, 0.999), "eps": 6.25e-10}

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        if self.cfg.init_b_dec_geometric_median and not self.cfg.is_transcoder:
            self.b_dec.copy_(geometric_median(self.normalize_input(x)[0].float()))

    def before_optimizer_step(self) -> None:
        self.remove_parallel_decoder_grad()

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.set_decoder_norm_to_unit()

    # ---- training: codes, then Gao et al.'s normalised MSE, Multi-TopK and AuxK ------------------------
    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        """The sparse kernels (chunked exact top-k with the AuxK candidates selected in the same pass, sparse
        decode, sparse encoder/decoder gradients; saeforge/kernels) unless ``self.sparse_kernels`` is False,
        then plain autograd on dense pre-activations; both give the same losses and gradients (tested, and
        the weights after 20 optimizer steps). With Multi-TopK the top 4k are kept in ``extra``."""
        cfg = self.cfg
        x2 = x.reshape(-1, x.shape[-1])
        k_sel = min(4 * cfg.k, cfg.d_sae) if cfg.multi_topk else cfg.k
        if self.sparse_kernels:
            dead = inp.dead_mask if (inp.dead_mask is not None and cfg.aux_coef > 0) else None
            sel = topk_encode(x2, self.W_enc, self.b_enc, k_sel,
                              b_pre=self.b_dec if cfg.apply_b_dec_to_input else None, dead_mask=dead,
                              k_aux=min(cfg.k_aux, cfg.d_sae), chunk_rows=self.chunk_rows)
            codes = Codes(vals=sel.vals, idx=sel.idx, selection=sel)
        else:
            h = self.pre_acts(x2)
            vals, idx = topk_relu(h, k_sel)
            codes = Codes(vals=vals, idx=idx, h=h)
        if cfg.multi_topk:  # the top-k of the top-4k are the top-k
            codes.extra["top4k"] = (codes.vals, codes.idx)
            top, j = codes.vals.topk(cfg.k, dim=-1, sorted=False)
            codes.vals, codes.idx = top, codes.idx.gather(-1, j)
        return codes

    def reconstruction_denominator(self, y: Tensor) -> Tensor:
        # a constant (skip terms train through y); of the global batch under data parallelism
        return total_variance(y.reshape(-1, y.shape[-1])).clamp_min(1e-12).detach()

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        cfg, out = self.cfg, {}
        if cfg.multi_topk:
            v4, i4 = s.codes.extra["top4k"]
            out["mse_4k"] = (1 / 8, self.reconstruction_loss(s.y - sparse_decode(v4, i4, self.W_dec, self.b_dec),
                                                             s.denom))
        if s.inp.dead_mask is not None and cfg.aux_coef > 0:
            out["aux"] = (cfg.aux_coef, auxk(s, cfg.k_aux, self.W_dec, s.denom))
        return out
