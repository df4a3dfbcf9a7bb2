"""Synthetic superposition data: known sparse unit directions, more of them than dimensions, plus noise.

Used by the end-to-end recovery tests of every architecture and by benchmarks. Each row is
x = Σ_i a_i g_i + σ ε where g_i are ``n_features`` random unit vectors in R^d, each feature is active with
probability ``p`` (so about p·n features per row), active magnitudes are |N(0,1)| + 0.5 (bounded away
from zero), and ε ~ N(0, I).
"""
from __future__ import annotations

from typing import Iterator

import torch

from saeforge.activations.stream import ActivationBatch, Stream

SyntheticBatch = ActivationBatch  # the name this module's streams were first written with


class SuperpositionStream(Stream):
    """An endless, seeded :class:`ActivationStream` over one hook (``hook``) of synthetic data."""

    def __init__(self, d: int = 32, n_features: int = 64, p: float = 0.05, noise: float = 0.01,
                 batch_size: int = 1024, seed: int = 0, hook: str = "synthetic", n_batches: int | None = None):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_features, d, generator=g)
        self.directions = dirs / dirs.norm(dim=1, keepdim=True)
        self.d_in, self.n_features, self.p, self.noise = d, n_features, p, noise
        self.batch_size, self.seed, self.n_batches = batch_size, seed, n_batches
        self.hooks = [hook]
        self.d = {hook: d}

    def sample(self, n: int, gen: torch.Generator) -> Tensor:
        on = torch.rand(n, self.n_features, generator=gen) < self.p
        mag = torch.randn(n, self.n_features, generator=gen).abs() + 0.5
        return (on * mag) @ self.directions + self.noise * torch.randn(n, self.d_in, generator=gen)

    def iterate(self, skip_batches: int = 0) -> Iterator[SyntheticBatch]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        i = 0
        while self.n_batches is None or i < self.n_batches:
            x = self.sample(self.batch_size, gen)
            if i >= skip_batches:
                yield SyntheticBatch({self.hooks[0]: x})
            i += 1

    def identity(self) -> dict:
        return {"synthetic": {"d": self.d_in, "n_features": self.n_features, "p": self.p, "noise": self.noise,
                              "batch_size": self.batch_size, "seed": self.seed}}


def recovered_fraction(true_dirs: Tensor, W_dec: Tensor, threshold: float = 0.9) -> float:
    """Share of true directions whose best-matching decoder row has cosine > ``threshold``."""
    t = true_dirs / true_dirs.norm(dim=1, keepdim=True)
    w = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((t @ w.T).max(dim=1).values > threshold).float().mean().item()
