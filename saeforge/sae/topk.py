"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093).

z = TopK(W_enc (x − b_pre) + b_enc) with ReLU on the kept values; x̂ = W_dec z + b_pre.
Recipe constants (each from the paper, §2 and Appendix A; see docs/recipes/topk.md):

* b_pre initialised to the geometric median of a data sample (§A.1, following Bricken et al. 2023);
* encoder initialised to the transpose of the decoder (§A.1);
* decoder rows kept at unit norm, with the gradient component parallel to them removed (§A.1);
* loss = normalised MSE (‖e‖² over the batch variance) + α · AuxK, α = 1/32, k_aux a power of two near
  d_in/2 (512 for GPT-2's 768), a latent is dead after 10M tokens without firing (§A.2);
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
from saeforge.kernels.sparse_losses import fired_latents, sparse_auxk_loss
from saeforge.kernels.topk_autograd import sparse_decode as kernel_sparse_decode
from saeforge.kernels.topk_autograd import topk_encode
from saeforge.sae.base import ExportSpec, SAE, SAEConfig, TrainStepInput, TrainStepOutput, register
from saeforge.sae.geometric_median import geometric_median
from saeforge.sae.sparse import sparse_decode


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    k_aux: int | None = None  # None: the power of two nearest d_in / 2 (Gao et al. §A.2)
    aux_coef: float = 1 / 32
    multi_topk: bool = False  # add L(4k)/8 (Gao et al. §A.3)
    init_b_dec_geometric_median: bool = True

    SPARSITY_FIELD: ClassVar[str] = "k"

    def __post_init__(self) -> None:
        super().__post_init__()
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

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        """The sparse kernels (chunked exact top-k, sparse decode, sparse encoder/decoder gradients; see
        saeforge/kernels) unless ``self.sparse_kernels`` is False; both give the same loss and gradients."""
        if self.sparse_kernels:
            return self.sparse_training_forward(inp)
        return self.dense_training_forward(inp)

    def sparse_training_forward(self, inp: TrainStepInput, chunk_rows: int | None = None) -> TrainStepOutput:
        """:meth:`training_forward` on the sparse kernels: the encoder runs through
        :func:`~saeforge.kernels.topk_autograd.topk_encode` (chunked pre-activations, exact fast top-k, AuxK
        selected in the same pass, a backward of O(B·k·d) sparse products: no dense ``[B, d_sae]`` gradient,
        no dense ``xᵀ G`` product). Same losses and gradients as :meth:`dense_training_forward` (tested,
        and the weights after 20 optimizer steps)."""
        cfg = self.cfg
        x, y = self.working_inputs(inp)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        dead = inp.dead_mask if (inp.dead_mask is not None and cfg.aux_coef > 0) else None
        k_sel = min(4 * cfg.k, cfg.d_sae) if cfg.multi_topk else cfg.k
        b_pre = self.b_dec if cfg.apply_b_dec_to_input else None
        b_enc = self.b_enc
        codes = topk_encode(x2, self.W_enc, b_enc, k_sel, b_pre=b_pre, dead_mask=dead,
                            k_aux=min(cfg.k_aux, cfg.d_sae), chunk_rows=chunk_rows)
        if cfg.multi_topk:  # the top-k of the top-4k are the top-k
            v4, i4 = codes.vals, codes.idx
            top, j = v4.topk(cfg.k, dim=-1, sorted=False)
            vals, idx = top, i4.gather(-1, j)
        else:
            vals, idx = codes.vals, codes.idx
        y2 = y.reshape(-1, y.shape[-1])
        y_hat = kernel_sparse_decode(vals, idx, self.W_dec, self.b_dec)
        e = y2 - y_hat
        # a constant (skip terms train through y); of the global batch under data parallelism
        total_var = total_variance(y2).clamp_min(1e-12).detach()
        mse = e.pow(2).sum() / total_var
        losses = {"mse": mse}
        loss = mse
        if cfg.multi_topk:
            mse4 = (y2 - kernel_sparse_decode(v4, i4, self.W_dec, self.b_dec)).pow(2).sum() / total_var
            losses["mse_4k"] = mse4
            loss = loss + mse4 / 8
        if dead is not None:
            aux = sparse_auxk_loss(codes, e, dead, self.W_dec, total_var)
            losses["aux"] = aux
            loss = loss + cfg.aux_coef * aux
        active = vals > 0
        return TrainStepOutput(loss=loss, losses=losses, y_hat=y_hat.reshape(*lead, -1), y=y,
                               fired=fired_latents(idx, active, cfg.d_sae), l0=active.sum(-1).float().mean())


    def dense_training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        """The plain-autograd reference of :meth:`training_forward` (dense pre-activations and gradients)."""
        cfg = self.cfg
        x, y = self.working_inputs(inp)
        h = self.pre_acts(x)
        vals, idx = topk_relu(h, cfg.k)
        y_hat = sparse_decode(vals, idx, self.W_dec, self.b_dec)
        e = y - y_hat
        # a constant (skip terms train through y); of the global batch under data parallelism
        total_var = total_variance(y).clamp_min(1e-12).detach()
        mse = e.pow(2).sum() / total_var
        losses = {"mse": mse}
        loss = mse
        if cfg.multi_topk:
            v4, i4 = topk_relu(h, min(4 * cfg.k, cfg.d_sae))
            mse4 = (y - sparse_decode(v4, i4, self.W_dec, self.b_dec)).pow(2).sum() / total_var
            losses["mse_4k"] = mse4
            loss = loss + mse4 / 8
        if inp.dead_mask is not None and cfg.aux_coef > 0:
            # AuxK: the top-k_aux dead latents model the residual e (Gao et al. §A.2). No host sync:
            # live latents are masked to -inf, so rows with fewer dead latents pick zeros after ReLU.
            dead = inp.dead_mask
            k_aux = min(cfg.k_aux, cfg.d_sae)
            h_dead = h.masked_fill(~dead, float("-inf"))
            av, ai = h_dead.topk(k_aux, dim=-1, sorted=False)
            av = av.relu()
            e_hat = sparse_decode(av, ai, self.W_dec, None)
            aux = (e_hat - e.detach()).pow(2).sum() / total_var
            aux = torch.where(dead.any(), aux, torch.zeros_like(aux))
            losses["aux"] = aux
            loss = loss + cfg.aux_coef * aux
        active = vals > 0
        return TrainStepOutput(loss=loss, losses=losses, y_hat=y_hat, y=y,
                               fired=fired_latents(idx, active, cfg.d_sae), l0=active.sum(-1).float().mean())
