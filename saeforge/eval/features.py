"""Per-latent statistics: firing density, dead/dense latents, activation quantiles, decoder geometry.

* firing density of latent i = (# eval tokens with f_i ≠ 0) / N;
* dead latent: density 0 (never fired on the eval tokens); dense latent: density > ``dense_threshold``
  (default 0.1, the cut SAEBench and Gao et al. use for "dense" latents);
* activation max (over all eval tokens) and mean of the non-zero activations are exact; per-latent
  quantiles of the non-zero activations come from a uniform random sample of tokens (memory stays bounded
  for 65k-latent SAEs);
* decoder geometry: for each latent, max_j≠i |cos(W_dec[i], W_dec[j])|, computed a block of rows at a time
  so a 65k x 65k similarity matrix never exists at once.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


class FeatureStats:
    """Streaming per-latent counts, sums and maxima over the eval tokens."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.n = 0
        self.fire_count = np.zeros(d_sae, dtype=np.int64)
        self.act_sum = np.zeros(d_sae, dtype=np.float64)
        self.act_max = np.full(d_sae, -np.inf, dtype=np.float64)

    @torch.no_grad()
    def update(self, f: Tensor) -> None:
        if f.shape[0] == 0:
            return
        self.n += f.shape[0]
        self.fire_count += (f != 0).sum(0).cpu().numpy().astype(np.int64)
        self.act_sum += f.double().sum(0).cpu().numpy()
        self.act_max = np.maximum(self.act_max, f.max(0).values.double().cpu().numpy())

    def density(self) -> np.ndarray:
        return self.fire_count / max(self.n, 1)

    def merge(self, other: "FeatureStats") -> None:
        """Add another process's counts (sums, and the maximum of the maxima)."""
        self.n += other.n
        self.fire_count = self.fire_count + other.fire_count
        self.act_sum = self.act_sum + other.act_sum
        self.act_max = np.maximum(self.act_max, other.act_max)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@torch.no_grad()
def sparse_rows(f: Tensor, rows: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero entries of ``f[rows]`` as (values float32, latent index int32) — a quantile sample."""
    sub = f[rows]
    nz = sub.nonzero(as_tuple=True)
    return sub[nz].float().cpu().numpy(), nz[1].to(torch.int32).cpu().numpy()


def latent_quantiles(vals: np.ndarray, idx: np.ndarray, d_sae: int, qs: Sequence[float]) -> np.ndarray:
    """Per-latent quantiles of ``vals`` grouped by ``idx``: ``[d_sae, len(qs)]``, NaN for empty latents.

    Linear interpolation between order statistics, the definition ``numpy.quantile`` uses by default
    (Hyndman & Fan 1996, type 7); vectorised over latents with one sort.
    """
    out = np.full((d_sae, len(qs)), np.nan)
    if len(vals) == 0:
        return out
    order = np.lexsort((vals, idx))
    v = np.asarray(vals, dtype=np.float64)[order]
    counts = np.bincount(idx, minlength=d_sae)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    has = counts > 0
    c, s = counts[has], starts[has]
    for j, q in enumerate(qs):
        h = (c - 1) * float(q)
        lo = np.floor(h).astype(np.int64)
        hi = np.minimum(lo + 1, c - 1)
        w = h - lo
        out[has, j] = v[s + lo] + (v[s + hi] - v[s + lo]) * w
    return out


@torch.no_grad()
def decoder_max_cos(W_dec: Tensor, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each decoder row, max |cos| with any *other* row and which row that is.

    ``chunk_rows`` rows are compared with all rows at a time (default: a block of ~16M similarities), so
    memory is O(chunk · d_sae) rather than O(d_sae²).
    """
    w = W_dec.detach().float()
    n = w.shape[0]
    if n < 2:
        return np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    chunk = chunk_rows or max(1, (1 << 24) // n)
    best = torch.empty(n, device=w.device)
    arg = torch.empty(n, dtype=torch.long, device=w.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        sim = (w[s:e] @ w.T).abs_()
        r = torch.arange(e - s, device=w.device)
        sim[r, r + s] = -1.0  # never a latent's own row
        best[s:e], arg[s:e] = sim.max(dim=1)
    return best.cpu().numpy().astype(np.float64), arg.cpu().numpy()


def summarize(a: np.ndarray, qs: Sequence[float] = (0.1, 0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """Mean, quantiles and max of the finite entries of ``a`` (None when there are none)."""
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    keys = ["mean"] + [f"q{round(q * 100):02d}" for q in qs] + ["max"]
    if a.size == 0:
        return dict.fromkeys(keys)
    vals = [a.mean(), *np.quantile(a, qs), a.max()]
    return {k: float(v) for k, v in zip(keys, vals)}


def density_histogram(density: np.ndarray, n_tokens: int, bins_per_decade: int = 4) -> dict[str, Any]:
    """Histogram of log10(firing density) over the latents that fired at least once."""
    fired = density[density > 0]
    lo = math.floor(math.log10(1.0 / max(n_tokens, 1)) * bins_per_decade) / bins_per_decade
    edges = np.linspace(lo, 0.0, int(round(-lo * bins_per_decade)) + 1) if lo < 0 else np.array([-1.0, 0.0])
    counts, _ = np.histogram(np.log10(fired), bins=edges) if fired.size else (np.zeros(len(edges) - 1, int), None)
    return {"log10_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def feature_summary(
    stats: FeatureStats,
    sample: tuple[np.ndarray, np.ndarray, int],
    W_dec: Tensor | None,
    dense_threshold: float = 0.1,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9, 0.99),
    decoder_chunk: int | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON summary and per-latent arrays (for ``features.npz``) from the accumulated statistics.

    ``sample`` = (values, latent indices, number of sampled tokens) of the quantile sample.
    """
    d = stats.d_sae
    dens = stats.density()
    fired = stats.fire_count > 0
    dead = int((~fired).sum())
    dense = int((dens > dense_threshold).sum())
    mean_nz = np.where(fired, stats.act_sum / np.maximum(stats.fire_count, 1), np.nan)
    act_max = np.where(fired, stats.act_max, np.nan)
    vals, idx, n_sample = sample
    q = latent_quantiles(vals, idx, d, quantiles)
    qnames = [f"q{round(x * 100):02d}" for x in quantiles]
    summary: dict[str, Any] = {
        "d_sae": d,
        "n_tokens": stats.n,
        "dead": dead,
        "dead_frac": dead / d,
        "dense": dense,
        "dense_frac": dense / d,
        "dense_threshold": dense_threshold,
        "density": {
            **summarize(dens, quantiles),
            "log10_hist": density_histogram(dens, stats.n),
        },
        "activation": {
            "max": summarize(act_max, quantiles),
            "mean_nonzero": summarize(mean_nz, quantiles),
            "sample_tokens": int(n_sample),
            "sample_latents": int((~np.isnan(q[:, 0])).sum()) if len(quantiles) else 0,
            "latent_quantiles_median": {n: _nanmedian(q[:, j]) for j, n in enumerate(qnames)},
        },
    }
    arrays = {
        "density": dens,
        "fire_count": stats.fire_count,
        "act_max": act_max,
        "act_mean_nonzero": mean_nz,
        "act_quantiles": q,
        "quantile_levels": np.asarray(quantiles, dtype=np.float64),
    }
    if W_dec is not None:
        best, arg = decoder_max_cos(W_dec, decoder_chunk)
        summary["decoder_cos"] = {
            **summarize(best, quantiles),
            "frac_above_0.9": float((best > 0.9).mean()) if best.size else None,
        }
        arrays["decoder_max_abs_cos"] = best
        arrays["decoder_nearest"] = arg
    return summary, arrays


def _nanmedian(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None
