"""Joint scaling law of reconstruction loss in width ``n`` and sparsity ``k`` (Gao et al. 2024, §3).

    L(n, k) = exp(α + β_k log k + β_n log n + γ log k log n) + exp(ζ + η log k)

The first term is the reducible loss, a power law in ``n`` whose exponent drifts with ``k`` (γ); the second an
irreducible loss that depends on ``k`` only. ``L`` is the held-out normalised MSE of each SAE of a sweep.

Fit: nonlinear least squares on ``log L`` (default; each point weighs the same whatever its loss scale, as on the
paper's log-log plots) or on ``L`` itself (``space="linear"``), with SciPy's trust-region solver started from a
grid of irreducible-term guesses (the reducible term's guess comes from a linear fit of log L).

Identifiability comes first: six constants need at least seven *distinct* (n, k) grid points, and points of
different architectures follow different laws, so a grid that cannot identify the law is refused with the
reason (a 2×2 grid of TopK and BatchTopK SAEs once gave R² 0.47 with zero-width intervals). A grid with fewer
than three widths or three k values, or a Jacobian of deficient rank, is fitted with a warning, and the
constants it cannot pin down get infinite intervals, never zero-width ones.

Confidence intervals: by default the standard error of 200 residual-bootstrap refits times the Student-t
quantile of the residual degrees of freedom, for sweeps of under 30 SAEs (honest on few points), else Gauss–Newton covariance ``s² (JᵀJ)⁻¹`` with Student-t quantiles;
``bootstrap=B`` forces ``B`` resamples, ``bootstrap=0`` the covariance.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saeforge.errors import SaeforgeError
from saeforge.io import atomic_open

PARAMS = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")


def scaling_law(theta: Sequence[float], n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``L(n, k)`` for parameters ``theta = (α, β_k, β_n, γ, ζ, η)``."""
    a, bk, bn, g, z, e = theta
    ln, lk = np.log(n), np.log(k)
    return np.exp(a + bk * lk + bn * ln + g * lk * ln) + np.exp(z + e * lk)


def _get(p: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if p.get(key) is not None:
            return p[key]
    return None


def _points(points: Sequence[dict], arch: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays (n, k, loss). ``d_sae`` is accepted for ``n`` and ``fvu`` for ``loss`` (the eval frontier's
    names); points lacking any of the three (e.g. an L1 SAE has no ``k``) are left out, and with ``arch`` set,
    so are points of other architectures."""
    rows = []
    if arch is not None:
        points = [p for p in points if isinstance(p, dict) and p.get("arch") == arch]
    archs = sorted({str(p["arch"]) for p in points if isinstance(p, dict) and p.get("arch") is not None
                    and p.get("k") is not None})
    if len(archs) > 1:
        raise SaeforgeError(f"the sweep mixes architectures {archs}, whose losses follow different laws; fit one "
                            f"at a time (fit_scaling_law(points, arch='{archs[0]}'))")
    for p in points:
        if not isinstance(p, dict):
            raise SaeforgeError("scaling points must be dicts with numeric 'n', 'k' and 'loss'")
        vals = (_get(p, ("n", "d_sae")), _get(p, ("k",)), _get(p, ("loss", "fvu")))
        if any(v is None for v in vals):
            continue
        try:
            rows.append([float(v) for v in vals])
        except (TypeError, ValueError):
            raise SaeforgeError("scaling points must be dicts with numeric 'n', 'k' and 'loss'") from None
    if not rows and points:
        raise SaeforgeError("scaling points must be dicts with numeric 'n', 'k' and 'loss'")
    if len(rows) < 7:
        raise SaeforgeError(f"the scaling law has 6 constants; give at least 7 (n, k, loss) points, got {len(rows)}")
    n, k, L = np.array(rows).T
    if np.any(n <= 0) or np.any(k <= 0) or np.any(L <= 0) or not np.all(np.isfinite(L)):
        raise SaeforgeError("scaling points need n > 0, k > 0 and a finite loss > 0")
    if len(np.unique(n)) < 2 or len(np.unique(k)) < 2:
        raise SaeforgeError("the sweep must vary both n and k (at least 2 values each) to fit L(n, k)")
    cells = len({(a, b) for a, b in zip(n, k)})
    if cells < 7:
        raise SaeforgeError(f"the sweep has {cells} distinct (n, k) pairs; the law has 6 constants and needs at "
                            "least 7 (e.g. 3 widths x 3 values of k)")
    return n, k, L


def _fit_once(n, k, L, space: str, max_nfev: int) -> tuple[np.ndarray, float, Any]:
    from scipy.optimize import least_squares

    ln, lk = np.log(n), np.log(k)

    def resid(th):
        pred = scaling_law(th, n, k)
        return np.log(pred) - np.log(L) if space == "log" else pred - L

    A = np.stack([np.ones_like(ln), lk, ln, lk * ln], 1)
    best = None
    for frac in (0.05, 0.2, 0.5, 0.8):
        # irreducible guess: a fraction of the smallest loss, flat in k; reducible: linear fit of the rest
        z0 = math.log(frac * L.min())
        rest = np.clip(L - math.exp(z0), 1e-3 * L, None)
        coef = np.linalg.lstsq(A, np.log(rest), rcond=None)[0]
        x0 = np.array([*coef, z0, 0.0])
        r = least_squares(resid, x0, method="trf", x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15,
                          max_nfev=max_nfev)
        cost = float(np.sum(r.fun ** 2))
        if best is None or cost < best[1]:
            best = (r.x, cost, r)
    return best


def _refit(theta0: np.ndarray, n, k, L, space: str, max_nfev: int) -> np.ndarray:
    """One least-squares fit started from ``theta0`` (bootstrap refits start from the full fit)."""
    from scipy.optimize import least_squares

    def resid(th):
        pred = scaling_law(th, n, k)
        return np.log(pred) - np.log(L) if space == "log" else pred - L

    return least_squares(resid, theta0, method="trf", x_scale="jac", max_nfev=max_nfev).x


def fit_scaling_law(
    points: Sequence[dict], space: str = "log", bootstrap: int | None = None, seed: int = 0,
    max_nfev: int = 20_000, arch: str | None = None,
) -> dict[str, Any]:
    """Fit ``L(n, k)`` to sweep points ``[{"n": width, "k": k, "loss": held-out normalised MSE}, ...]``
    (``d_sae`` / ``fvu`` are read as ``n`` / ``loss``; points missing a value are skipped; ``arch`` keeps only
    that architecture's points).

    Returns ``{"params": {name: value}, "stderr": {...}, "ci95": {name: [lo, hi]}, "ci_method", "rss",
    "r2", "space", "n_points", "warnings": [...], "summary": {...}}``.
    """
    if space not in ("log", "linear"):
        raise SaeforgeError(f"space={space!r}; use 'log' or 'linear'")
    n, k, L = _points(points, arch)
    warnings_: list[str] = []
    if len(np.unique(n)) < 3 or len(np.unique(k)) < 3:
        warnings_.append(f"only {len(np.unique(n))} widths and {len(np.unique(k))} values of k: the curvature "
                         "terms (gamma, and eta for the irreducible loss) are barely identified; sweep 3+ of each")
    theta, rss, res = _fit_once(n, k, L, space, max_nfev)
    dof = len(L) - len(theta)
    J = res.jac
    s2 = rss / dof if dof > 0 else float("nan")
    sv = np.linalg.svd(J, compute_uv=False)
    rank = int(np.sum(sv > sv.max() * 1e-10)) if sv.size else 0
    if rank < len(theta):
        warnings_.append(f"the fit's Jacobian has rank {rank} < {len(theta)}: some constants are not identified "
                         "by this grid (their intervals are infinite)")
    try:
        cov = s2 * np.linalg.pinv(J.T @ J)
        stderr = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        stderr = np.full(len(theta), float("nan"))
    if rank < len(theta) or not np.isfinite(s2):
        stderr = np.full(len(theta), float("inf"))
    if bootstrap is None:
        bootstrap = 200 if len(L) < 30 else 0
    if bootstrap > 0:
        # residual bootstrap: the grid stays the design (a case resample of a small grid often cannot identify
        # the law); residuals, inflated by sqrt(N / dof) for the fitted constants, are redrawn onto the fit
        rng = np.random.default_rng(seed)
        fitted = scaling_law(theta, n, k)
        resid = (np.log(L) - np.log(fitted)) if space == "log" else (L - fitted)
        resid = (resid - resid.mean()) * math.sqrt(len(L) / max(dof, 1))
        draws = []
        for _ in range(bootstrap):
            r = rng.choice(resid, len(L))
            Lb = fitted * np.exp(r) if space == "log" else np.clip(fitted + r, 1e-12, None)
            draws.append(_refit(theta, n, k, Lb, space, max_nfev))
        from scipy.stats import t as student_t

        # percentile intervals of so few residuals are too narrow; use the bootstrap's standard error with
        # the Student-t quantile of the residual degrees of freedom (3 for a 3 x 3 grid: +/- 3.2 s.e.)
        se = np.array(draws).std(axis=0, ddof=1)
        q = student_t.ppf(0.975, max(dof, 1))
        lo, hi = theta - q * se, theta + q * se
        stderr = np.where(np.isfinite(stderr), se, stderr)
        method = f"bootstrap-t ({len(draws)} residual resamples, Student t on {max(dof, 1)} dof)"
    else:
        from scipy.stats import t as student_t

        q = student_t.ppf(0.975, dof) if dof > 0 else float("nan")
        lo, hi = theta - q * stderr, theta + q * stderr
        method = "Gauss-Newton covariance, Student t"
    if rank < len(theta):  # unidentified: never report a finite interval
        lo, hi = np.full(len(theta), -np.inf), np.full(len(theta), np.inf)
    target = np.log(L) if space == "log" else L
    r2 = 1 - rss / float(np.sum((target - target.mean()) ** 2))
    params = {p: float(v) for p, v in zip(PARAMS, theta)}
    for w in warnings_:
        print(f"saeforge scaling fit: warning: {w}", file=sys.stderr)
    return {
        "params": params,
        "stderr": {p: float(v) for p, v in zip(PARAMS, stderr)},
        "ci95": {p: [float(a), float(b)] for p, a, b in zip(PARAMS, lo, hi)},
        "ci_method": method,
        "rss": rss,
        "r2": float(r2),
        "space": space,
        "n_points": int(len(L)),
        "warnings": warnings_,
        "summary": {**params, "r2": float(r2), "n_points": int(len(L))},
    }


def plot_scaling(fit: dict[str, Any], points: Sequence[dict], path: str | Path) -> Path:
    """Two log-log panels: L against n (one curve per k) and L against k (one curve per n); PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k, L = _points(points)
    theta = [fit["params"][p] for p in PARAMS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, (x, other, xname, oname) in zip(axes, ((n, k, "n (latents)", "k"), (k, n, "k (active latents)", "n"))):
        levels = np.unique(other)
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        for i, lv in enumerate(levels):
            c = cmap(i / max(len(levels) - 1, 1))
            sel = other == lv
            ax.scatter(x[sel], L[sel], color=c, zorder=3)
            nn, kk = (grid, np.full_like(grid, lv)) if xname.startswith("n") else (np.full_like(grid, lv), grid)
            ax.plot(grid, scaling_law(theta, nn, kk), color=c, label=f"{oname}={lv:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xname)
        ax.set_ylabel("normalised MSE")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    p = fit["params"]
    fig.suptitle(
        f"L = exp({p['alpha']:.2f} {p['beta_k']:+.2f} log k {p['beta_n']:+.2f} log n {p['gamma']:+.3f} log k log n)"
        f" + exp({p['zeta']:.2f} {p['eta']:+.2f} log k)   (R² {fit['r2']:.3f})",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path
