"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, arXiv:2503.17547).

Latents are split into consecutive groups; prefix j is groups 1..j. Each prefix must reconstruct the input
on its own, which pushes general features into the early latents:

    L = Σ_j w_j ‖y − (f_{1:m_j} W_dec,{1:m_j} + b_dec)‖² + α AuxK,

with f the BatchTopK code of the *whole* dictionary (one code; the prefixes only truncate the decoding).
The weights w_j are uniform (1/#groups), the loss form of the paper's reference implementation
(dictionary_learning's ``MatryoshkaBatchTopKTrainer``, cited by the paper as the code used); AuxK models
the full reconstruction's residual. Inference is plain BatchTopK inference (one global threshold).
See docs/recipes/matryoshka.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from saeforge.errors import SaeforgeError
from saeforge.sae.base import ExportSpec, TrainStepInput, TrainStepOutput, register
from saeforge.sae.batchtopk import BatchTopKConfig, BatchTopKSAE, batch_topk
from saeforge.sae.functional import auxk_loss

# dictionary_learning's demo configuration for Matryoshka BatchTopK (our default; the paper sweeps it)
DEFAULT_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    group_fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    group_sizes: list[int] | None = None  # None: from group_fractions (the last group takes the remainder)
    group_weights: list[float] | None = None  # None: uniform 1/#groups

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_sizes is None:
            if abs(sum(self.group_fractions) - 1) > 1e-6:
                raise SaeforgeError(f"group_fractions {self.group_fractions} must sum to 1")
            sizes = [int(f * self.d_sae) for f in self.group_fractions[:-1]]
            self.group_sizes = sizes + [self.d_sae - sum(sizes)]
        if sum(self.group_sizes) != self.d_sae or any(s <= 0 for s in self.group_sizes):
            raise SaeforgeError(
                f"matryoshka groups {self.group_sizes} must be positive and sum to d_sae={self.d_sae}; "
                "use a wider SAE or set group_fractions / group_sizes"
            )
        if self.group_weights is None:
            self.group_weights = [1.0 / len(self.group_sizes)] * len(self.group_sizes)
        if len(self.group_weights) != len(self.group_sizes):
            raise SaeforgeError("group_weights needs one weight per group")


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def export_spec(self) -> ExportSpec:
        spec = super().export_spec()
        spec.groups, spec.group_weights = list(self.cfg.group_sizes), list(self.cfg.group_weights)
        return spec

    def prefix_reconstructions(self, f: Tensor) -> list[Tensor]:
        """ŷ of every prefix (cumulative sums of the groups' contributions), smallest first."""
        outs, acc, start = [], self.b_dec.expand(f.shape[0], -1), 0
        for size in self.cfg.group_sizes:
            acc = acc + f[:, start:start + size] @ self.W_dec[start:start + size]
            outs.append(acc)
            start += size
        return outs

    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        cfg = self.cfg
        x, y = self.working_inputs(inp)
        h = self.pre_acts(x)
        f = batch_topk(h, cfg.k)
        self.update_threshold(f, inp.step, inp.total_steps)
        recons = self.prefix_reconstructions(f)
        prefix_losses = [(y - r).pow(2).sum(-1).mean() for r in recons]
        loss = sum(w * l for w, l in zip(cfg.group_weights, prefix_losses))
        y_hat = recons[-1]
        e = y - y_hat
        losses = {"mse": prefix_losses[-1], "mse_prefix_min": prefix_losses[0]}
        if inp.dead_mask is not None and cfg.aux_coef > 0:
            denom = (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
            aux = auxk_loss(h, e, inp.dead_mask, cfg.k_aux, self.W_dec, denom)
            losses["aux"] = aux
            loss = loss + cfg.aux_coef * aux
        active = f > 0
        return TrainStepOutput(loss=loss, losses=losses, y_hat=y_hat, y=y, fired=active.any(0),
                               l0=active.sum(-1).float().mean())

