"""Reconstruction metrics of an SAE on held-out activations, accumulated exactly over a stream.

Every metric is a ratio of sums over *all* evaluation tokens, never a mean of per-batch ratios, so the
result does not depend on how the tokens were batched (or on where an interrupted run resumed). Sums are
kept in float64. The target variance uses Chan, Golub & LeVeque's pairwise update ("Updating formulae and a
pairwise algorithm for computing sample variances", 1979): each batch contributes its own mean and sum of
squared deviations, merged with ``M2 = M2_a + M2_b + ‖μ_b − μ_a‖² · n_a n_b / n``, which is exact
algebraically and avoids the cancellation of ``Σ‖y‖² − n‖ȳ‖²`` when the activations have a large mean
(residual streams do).

Definitions (N tokens, target y ∈ R^d, reconstruction ŷ, codes f ∈ R^{d_sae}):

* FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖²  (ȳ the mean over the N eval tokens); explained variance = 1 − FVU
* MSE = Σ‖y − ŷ‖² / (N d)
* cosine similarity = mean over tokens of y·ŷ / (‖y‖ ‖ŷ‖)
* relative norm = mean over tokens of ‖ŷ‖ / ‖y‖  (SAELens's ``l2_ratio``)
* relative reconstruction bias = Σ‖ŷ‖² / Σ y·ŷ  (Wright & Sharkey 2024; < 1 means shrinkage)
* L0 = mean over tokens of #{i : f_i ≠ 0}
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saeforge.sae.base import SAE

_EPS = 1e-12


def _sae_dtype(sae: SAE) -> torch.dtype:
    return next(sae.parameters()).dtype


@torch.no_grad()
def encode_decode(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """Codes ``f`` and the full reconstruction ``sae(x)`` (skip term included), with one encode.

    Uses the SAE's own ``encode``/``decode``/``skip_term``, so any architecture or format reader works; an
    SAE class that overrides ``forward`` is respected by calling it for the reconstruction.
    """
    x = x.to(_sae_dtype(sae))
    f = sae.encode(x)
    if type(sae).forward is not SAE.forward:
        return f, sae(x)
    y_hat = sae.decode(f)
    if sae.cfg.skip:
        y_hat = y_hat + sae.skip_term(x)
    return f, y_hat


def rows_per_step(d_sae: int, budget: int = 1 << 25) -> int:
    """Rows to encode at once so the dense code matrix stays under ``budget`` floats (128 MB in fp32)."""
    return max(1, budget // max(d_sae, 1))


class ReconStats:
    """Streaming sums for the reconstruction metrics of one SAE (see the module docstring)."""

    def __init__(self, d_out: int):
        self.d_out = d_out
        self.n = 0
        self.mean = np.zeros(d_out, dtype=np.float64)  # running mean of the target
        self.m2 = 0.0  # Σ‖y − ȳ‖² so far
        self.sse = 0.0  # Σ‖y − ŷ‖²
        self.cos_sum = 0.0
        self.rel_norm_sum = 0.0
        self.dot_sum = 0.0  # Σ y·ŷ
        self.yhat_sq_sum = 0.0  # Σ‖ŷ‖²
        self.l0_sum = 0.0
        self.l0_sq_sum = 0.0

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, f: Tensor) -> None:
        """Add a batch of targets ``y [B, d]``, reconstructions ``y_hat [B, d]`` and codes ``f [B, d_sae]``."""
        b = y.shape[0]
        if b == 0:
            return
        y = y.double()
        y_hat = y_hat.double()
        mu_b = y.mean(0)
        m2_b = float((y - mu_b).pow(2).sum())
        mu_b_np = mu_b.cpu().numpy()
        n_a, n = self.n, self.n + b
        delta = mu_b_np - self.mean
        self.m2 += m2_b + float(delta @ delta) * n_a * b / n
        self.mean = self.mean + delta * (b / n)
        self.n = n

        err = y - y_hat
        self.sse += float(err.pow(2).sum())
        y_norm = y.norm(dim=-1)
        yh_norm = y_hat.norm(dim=-1)
        dot = (y * y_hat).sum(-1)
        self.cos_sum += float((dot / (y_norm * yh_norm).clamp_min(_EPS)).sum())
        self.rel_norm_sum += float((yh_norm / y_norm.clamp_min(_EPS)).sum())
        self.dot_sum += float(dot.sum())
        self.yhat_sq_sum += float(yh_norm.pow(2).sum())
        l0 = (f != 0).sum(-1).double()
        self.l0_sum += float(l0.sum())
        self.l0_sq_sum += float(l0.pow(2).sum())

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        fvu = self.sse / self.m2 if self.m2 > 0 else math.nan
        l0 = self.l0_sum / n
        return {
            "n_tokens": self.n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / (n * self.d_out),
            "cos_sim": self.cos_sum / n,
            "rel_norm": self.rel_norm_sum / n,
            "rel_bias": self.yhat_sq_sum / self.dot_sum if self.dot_sum != 0 else math.nan,
            "l0": l0,
            "l0_std": math.sqrt(max(self.l0_sq_sum / n - l0 * l0, 0.0)),
            "target_variance": self.m2 / n,  # mean over tokens of ‖y − ȳ‖²
        }

    def merge(self, other: "ReconStats") -> None:
        """Add the sums of ``other`` (another process's tokens): Chan et al.'s pairwise mean/M2 update, the
        rest are plain sums, so the merged result is the one of all the tokens."""
        if other.n == 0:
            return
        n_a, b = self.n, other.n
        n = n_a + b
        delta = np.asarray(other.mean, dtype=np.float64) - self.mean
        self.m2 += other.m2 + float(delta @ delta) * n_a * b / n
        self.mean = self.mean + delta * (b / n)
        self.n = n
        for k in ("sse", "cos_sum", "rel_norm_sum", "dot_sum", "yhat_sq_sum", "l0_sum", "l0_sq_sum"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, np.asarray(v, dtype=np.float64) if k == "mean" else v)


@torch.no_grad()
def reconstruction_metrics(sae: SAE, x: Tensor, y: Tensor | None = None, batch_rows: int | None = None) -> dict[str, Any]:
    """One-call reconstruction metrics of ``sae`` on rows ``x`` (target ``y``, default ``x``)."""
    y = x if y is None else y
    stats = ReconStats(y.shape[-1])
    step = batch_rows or rows_per_step(sae.cfg.d_sae)
    for i in range(0, x.shape[0], step):
        f, y_hat = encode_decode(sae, x[i:i + step])
        stats.update(y[i:i + step], y_hat, f)
    return stats.result()


class HookReconStats:
    """The reconstruction sums of each output hook of an SAE that reconstructs several (a crosscoder): one
    :class:`ReconStats` per hook, fed that hook's slice of the targets and reconstructions (the codes, and so
    L0, are shared). Empty for an SAE with one output hook, whose totals are already that hook's."""

    def __init__(self, hooks: list[str], d: list[int]):
        self.hooks = list(hooks) if len(hooks) > 1 else []
        self.parts = [ReconStats(w) for w in d[:len(self.hooks)]]

    def update(self, ys: list[Tensor], y_hats: list[Tensor], f: Tensor) -> None:
        for s, y, y_hat in zip(self.parts, ys, y_hats):
            s.update(y, y_hat, f)

    def result(self) -> dict[str, dict[str, Any]]:
        return {h: s.result() for h, s in zip(self.hooks, self.parts)}

    def merge(self, other: "HookReconStats") -> None:
        for s, o in zip(self.parts, other.parts):
            s.merge(o)

    def state_dict(self) -> dict[str, Any]:
        return {"hooks": list(self.hooks), "parts": [s.state_dict() for s in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hooks = list(state["hooks"])
        self.parts = []
        for st in state["parts"]:
            s = ReconStats(int(st["d_out"]))
            s.load_state_dict(st)
            self.parts.append(s)
