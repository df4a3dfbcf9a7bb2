"""benchmarks/magnitudes.py on a case worked by hand: an SAE that fires exactly the right latents and codes each
0.1 too small (an L1 penalty's shrinkage, made exact)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from saeforge.sae import create_sae, make_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import magnitudes  # noqa: E402


def _shrinking_sae(d: int):
    sae = create_sae(make_config("relu", d_in=d, d_sae=d, scale_inputs=False))
    with torch.no_grad():  # f = ReLU(x − 0.1), x̂ = f: the right latents, each 0.1 short
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.fill_(-0.1)
        sae.b_dec.zero_()
    return sae.eval()


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, d, generator=g) < 0.25
    return on * (0.5 + torch.rand(n, d, generator=g))  # active magnitudes in [0.5, 1.5): never below the 0.1


def test_oracle_recovers_the_magnitudes_and_the_refit_only_part_of_them():
    d = 8
    sae, train, held = _shrinking_sae(d), _rows(20000, d, 0), _rows(4000, d, 1)
    var = ((held - held.mean(0)) ** 2).sum().item()
    fvu = 0.01 * (held > 0).sum().item() / var  # each active entry is off by exactly 0.1
    with torch.no_grad():
        assert abs(((sae.decode(sae.encode(held)) - held) ** 2).sum().item() / var - fvu) < 1e-6
    assert magnitudes.oracle_fvu(sae, held) < 1e-8  # least squares on the true support reconstructs exactly
    refit = magnitudes.refit_fvu(sae, train, held)
    assert 0 < refit < fvu  # a linear decoder cannot add 0.1 only where a latent fires, but b_d takes the mean
