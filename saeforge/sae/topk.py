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

import torch
from torch import Tensor

from saeforge.distributed.ops import total_variance
from saeforge.errors import SaeforgeError
from saeforge.kernels.topk_step import fired_latents, topk_training_forward
from saeforge.sae.base import SAE, SAEConfig, TrainStepInput, TrainStepOutput, register
from saeforge.sae.geometric_median import geometric_median
from saeforge.sae.sparse import sparse_decode


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    k_aux: int | None = None  # None: the power of two nearest d_in / 2 (Gao et al. §A.2)
    aux_coef: float = 1 / 32
    multi_topk: bool = False  # add L(4k)/8 (Gao et al. §A.3)
    init_b_dec_geometric_median: bool = True

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

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_n, self._norm_ctx = self.normalize_input(x)
        return topk_relu(self.pre_acts(x_n), self.cfg.k)

    def recommended_lr(self) -> float:
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
            return topk_training_forward(self, inp)
        return self.dense_training_forward(inp)

    def dense_training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        """The plain-autograd reference of :meth:`training_forward` (dense pre-activations and gradients)."""
        cfg = self.cfg
        x, y = self.working_inputs(inp)
        h = self.pre_acts(x)
        vals, idx = topk_relu(h, cfg.k)
        y_hat = sparse_decode(vals, idx, self.W_dec, self.b_dec)
        e = y - y_hat
        total_var = total_variance(y).clamp_min(1e-12)  # of the global batch under data parallelism
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
