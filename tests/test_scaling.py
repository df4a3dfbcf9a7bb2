"""Scaling-law fit: planted constants are recovered from synthetic sweeps; plots are written."""
from __future__ import annotations

import numpy as np
import pytest

from saeforge.errors import SaeforgeError
from saeforge.eval.scaling import PARAMS, fit_scaling_law, plot_scaling, scaling_law

PLANTED = dict(alpha=1.5, beta_k=-0.55, beta_n=-0.28, gamma=0.025, zeta=-2.8, eta=-0.25)


def _sweep(noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    theta = [PLANTED[p] for p in PARAMS]
    pts = []
    for n in (2**8, 2**9, 2**10, 2**11, 2**12, 2**13, 2**14):
        for k in (4, 8, 16, 32, 64, 128):
            L = float(scaling_law(theta, np.array(n, float), np.array(k, float)))
            pts.append({"n": n, "k": k, "loss": L * float(np.exp(noise * rng.normal()))})
    return pts


@pytest.mark.parametrize("space", ["log", "linear"])
def test_recovers_planted_constants(space):
    fit = fit_scaling_law(_sweep(), space=space)
    for p, v in PLANTED.items():
        assert fit["params"][p] == pytest.approx(v, rel=0.05), p
    assert fit["r2"] > 0.9999 and fit["n_points"] == 42


def test_noisy_sweep_within_5_percent_and_intervals_cover_truth():
    fit = fit_scaling_law(_sweep(noise=0.002, seed=3))
    for p, v in PLANTED.items():
        assert fit["params"][p] == pytest.approx(v, rel=0.05), p
        lo, hi = fit["ci95"][p]
        assert lo < fit["params"][p] < hi
        assert lo - 2 * (hi - lo) < v < hi + 2 * (hi - lo)  # the truth is near the 95% interval
    boot = fit_scaling_law(_sweep(noise=0.002, seed=3), bootstrap=8, seed=1)
    assert boot["ci_method"].startswith("bootstrap")
    assert all(boot["ci95"][p][0] <= boot["ci95"][p][1] for p in PARAMS)


def test_plot_writes_png(tmp_path):
    pts = _sweep()
    fit = fit_scaling_law(pts)
    out = plot_scaling(fit, pts, tmp_path / "sub" / "scaling.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_input():
    with pytest.raises(SaeforgeError, match="at least 7"):
        fit_scaling_law(_sweep()[:5])
    with pytest.raises(SaeforgeError, match="vary both"):
        fit_scaling_law([{"n": 2**i, "k": 8, "loss": 0.1 / i} for i in range(1, 10)])
    with pytest.raises(SaeforgeError, match="'n', 'k' and 'loss'"):
        fit_scaling_law([{"n": 1}] * 8)
    with pytest.raises(SaeforgeError, match="'n', 'k' and 'loss'"):
        fit_scaling_law([{"n": "wide", "k": 8, "loss": 0.1}] * 8)


def test_eval_frontier_names_are_accepted():
    # the eval report's frontier points say d_sae / fvu; SAEs without k (L1 SAEs) are left out
    pts = [{"d_sae": p["n"], "k": p["k"], "fvu": p["loss"], "name": "x"} for p in _sweep()]
    pts.append({"d_sae": 4096, "k": None, "fvu": 0.5})
    fit = fit_scaling_law(pts)
    assert fit["n_points"] == 42 and fit["params"]["beta_n"] == pytest.approx(PLANTED["beta_n"], rel=0.05)


def _grid(ns, ks, noise=0.0, seed=0, arch=None):
    rng = np.random.default_rng(seed)
    theta = [PLANTED[p] for p in PARAMS]
    return [{"n": n, "k": k, "arch": arch,
             "loss": float(scaling_law(theta, np.array(n, float), np.array(k, float))) * float(np.exp(noise * rng.normal()))}
            for n in ns for k in ks]


def test_grids_that_cannot_identify_the_law_are_refused():
    # the case: a 2x2 grid of TopK and BatchTopK SAEs (8 points, 4 distinct cells)
    mixed = _grid((512, 1024), (8, 16), arch="topk") + _grid((512, 1024), (8, 16), arch="batchtopk")
    with pytest.raises(SaeforgeError, match="mixes architectures"):
        fit_scaling_law(mixed)
    twice = _grid((512, 1024), (8, 16), arch="topk") + _grid((512, 1024), (8, 16), noise=0.01, arch="topk")
    with pytest.raises(SaeforgeError, match="4 distinct"):
        fit_scaling_law(twice)  # 8 SAEs of one architecture (two seeds), still only 4 cells for 6 constants
    with pytest.raises(SaeforgeError, match="at least 7"):
        fit_scaling_law(mixed, arch="topk")


def test_few_points_get_bootstrap_intervals_that_cover_the_truth():
    for seed in (1, 2, 3):  # three noisy 3 x 3 grids (9 SAEs each) of a law with known exponents
        fit = fit_scaling_law(_grid((2**9, 2**11, 2**13), (8, 32, 128), noise=0.003, seed=seed), seed=2,
                              bootstrap=60)
        assert fit["ci_method"].startswith("bootstrap") and fit["n_points"] == 9
        for p in ("beta_n", "beta_k", "gamma"):
            lo, hi = fit["ci95"][p]
            assert lo <= PLANTED[p] <= hi, (seed, p, lo, hi)
        assert all(fit["ci95"][p][1] - fit["ci95"][p][0] > 0 for p in PARAMS)  # never zero-width


def test_thin_grid_is_fitted_with_a_warning(capsys):
    fit = fit_scaling_law(_grid((2**9, 2**12), (4, 8, 16, 32), noise=0.002), bootstrap=20)
    assert any("2 widths" in w for w in fit["warnings"])
    assert "warning" in capsys.readouterr().err
