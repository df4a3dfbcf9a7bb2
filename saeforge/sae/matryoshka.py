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
from saeforge.sae.base import ExportSpec, Codes, StepState, TrainStepInput, register
from saeforge.sae.batchtopk import BatchTopKConfig, BatchTopKSAE, global_batch_topk

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

    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        """BatchTopK's dense codes (the prefix losses need the dense code of every group)."""
        h = self.pre_acts(x)
        f = global_batch_topk(h, self.cfg.k, inp.global_rows)
        self.update_threshold(f, inp.step, inp.total_steps)
        return Codes(f=f, h=h)

    def training_decode(self, codes: Codes) -> Tensor:
        """The whole dictionary's ŷ, the last of the prefix reconstructions (kept for the prefix losses)."""
        codes.extra["prefixes"] = self.prefix_reconstructions(codes.f)
        return codes.extra["prefixes"][-1]

    def reconstruction_weight(self) -> float:
        return self.cfg.group_weights[-1]

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        """The smaller prefixes' losses, each with its group weight (the whole dictionary's is ``mse``), and
        AuxK on the whole dictionary's residual."""
        cfg = self.cfg
        out = {}
        for j, r in enumerate(s.codes.extra["prefixes"][:-1]):
            out["mse_prefix_min" if j == 0 else f"mse_prefix{j}"] = (cfg.group_weights[j],
                                                                      (s.y - r).pow(2).sum(-1).mean())
        return {**out, **super().penalties(s)}
