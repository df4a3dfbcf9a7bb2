"""Differentiable collectives and exact global statistics, built on :mod:`saeforge.distributed`.

* :func:`total_variance` -- ``Σ_rows ‖y − ȳ‖²`` of the *global* batch (the normaliser of the TopK family's
  loss), scaled to this process's share of the rows (see below). One process: exactly the old expression.
* :func:`sum_partials` -- forward: all-reduce (sum) of per-shard partial results (the decoder's partial
  sums under latent sharding); backward: identity (every shard computes the same loss from the sum, so the
  gradient of each partial is the gradient of the sum).
* :func:`sum_grad` -- forward: identity; backward: all-reduce (sum) of the gradient (a replicated
  parameter used by every shard's partial computation, e.g. ``b_pre`` in the encoder).

Loss convention under data parallelism: each replica's loss is the loss of the global batch *as estimated
from its rows*, and the gradient sync takes the row-weighted mean (weight ``n_local / n_global``). A loss
that is a mean over rows needs nothing; a sum normalised by the batch variance uses
``total_variance(y) = Σ_global ‖y − ȳ_global‖² · n_local / n_global``; then the weighted mean of the
replicas' gradients is exactly the single-process gradient of the global batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saeforge import distributed as dist


def total_variance(y: Tensor, group: dist.Group | None = None) -> Tensor:
    """``Σ ‖y − mean(y)‖²`` over the rows of the global batch (the rows of every process of the data
    group), times ``n_local / n_global``; with one process exactly ``(y − y.mean(0)).pow(2).sum()``."""
    g = group if group is not None else dist.data_group()
    if g.size == 1 or not dist.active():
        return (y - y.mean(0)).pow(2).sum()
    with torch.no_grad():
        yd = y.detach()
        n_local = yd.shape[0]
        stats = torch.cat([yd.double().sum(0).reshape(-1), yd.new_tensor([n_local], dtype=torch.float64)])
        dist.all_reduce(stats, group=g)
        n_global = stats[-1]
        mean = (stats[:-1] / n_global).to(yd.dtype).reshape(yd.shape[1:])
        part = (yd - mean).double().pow(2).sum().reshape(1)
        dist.all_reduce(part, group=g)
        return (part[0] * (n_local / n_global)).to(y.dtype)


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, group: dist.Group) -> Tensor:
        out = t.clone()
        return dist.all_reduce(out, group=group)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g, None


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, group: dist.Group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return dist.all_reduce(g.contiguous().clone(), group=ctx.group), None


def sum_partials(t: Tensor, group: dist.Group) -> Tensor:
    """Sum of ``t`` over ``group`` (all-reduce); the backward passes the gradient through unchanged."""
    return t if group.size == 1 else _SumPartials.apply(t, group)


def sum_grad(t: Tensor, group: dist.Group) -> Tensor:
    """``t`` unchanged; the backward sums its gradient over ``group``."""
    return t if group.size == 1 else _SumGrad.apply(t, group)


@torch.no_grad()
def batch_topk_threshold(v: Tensor, k: int, global_rows: int | None = None, group: dist.Group | None = None) -> Tensor:
    """The smallest of the top ``rows · k`` entries of ``v [rows, n]`` over the *global* batch (the rows of
    every process of the data group): BatchTopK's selection is ``v >= threshold``. Each process offers its
    own top ``N`` values (``N`` = global rows · k, the most any one process can contribute), padded with
    −inf; one all-gather and a top-``N`` of the union give the exact global threshold on every process. With
    one process (or ``N`` ≥ every value) it is the ``N``-th largest value of ``v`` itself. ``global_rows`` (the
    trainer knows it) saves a row-count all-reduce and its host read."""
    g = group if group is not None else dist.data_group()
    flat = v.detach().flatten()
    if g.size == 1 or not dist.active():
        n = min(flat.numel(), v.shape[0] * k)
        return flat.topk(n, sorted=False).values.min()
    if global_rows is None:
        rows = v.new_tensor([v.shape[0]], dtype=torch.float64)
        global_rows = int(dist.all_reduce(rows, group=g).item())
    n = global_rows * k
    local = flat.topk(min(n, flat.numel()), sorted=False).values
    if local.numel() < n:
        local = torch.cat([local, local.new_full((n - local.numel(),), float("-inf"))])
    union = torch.cat(dist.all_gather(local.contiguous(), group=g))
    return union.topk(n, sorted=False).values.min()
