"""What to keep from each chunk of pre-activations: TopK, BatchTopK and AuxK selection rules.

A selector sees the dense pre-activations one chunk of rows at a time (never the whole ``[B, n]``
tensor) and returns raw pre-activation values with their latent indices; the encoder Function in
:mod:`saeforge.kernels.topk_autograd` applies the ReLU and differentiates through the kept entries only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from saeforge.kernels.select import topk_among, topk_rows


class AuxKSelector:
    """AuxK's top-``k_aux`` among the ``dead`` latents (Gao et al. 2024, §A.2), chunk by chunk.

    Follows the reference exactly: live latents are excluded and the dead latents' values go through
    the same ReLU, so rows with fewer positive dead values pick zeros that add nothing. On CPU (where
    reading a count costs no device sync) only the dead columns are searched and the set is
    ``min(k_aux, n_dead)`` wide (empty when nothing is dead); on other devices the live columns are
    masked to −inf and the width stays ``k_aux``, so nothing waits on the host.
    """

    def __init__(self, dead_mask: Tensor, k_aux: int):
        self.dead_mask, self.k_aux = dead_mask, k_aux
        self.dead_cols: Tensor | None = None
        self.parts: list[tuple[Tensor, Tensor]] = []

    def begin(self, n: int, device: torch.device) -> None:
        self.k_aux = min(self.k_aux, n)
        self.parts = []
        if device.type == "cpu":
            self.dead_cols = torch.nonzero(self.dead_mask.to(device)).flatten()

    def chunk(self, h: Tensor) -> None:
        if self.dead_cols is None:
            hd = h.masked_fill(~self.dead_mask.to(h.device), float("-inf"))
            self.parts.append(topk_rows(hd, self.k_aux))
        elif self.dead_cols.numel() == 0:
            empty = h.new_zeros(h.shape[0], 0)
            self.parts.append((empty, empty.long()))
        else:
            self.parts.append(topk_among(h, self.dead_cols, self.k_aux))

    def result(self) -> tuple[Tensor, Tensor]:
        return torch.cat([p[0] for p in self.parts]), torch.cat([p[1] for p in self.parts])


class TopKSelector:
    """Per-row top-k (Gao et al. 2024), plus AuxK over ``dead_mask`` when ``k_aux`` > 0."""

    def __init__(self, k: int, dead_mask: Tensor | None = None, k_aux: int = 0):
        self.k = k
        self.aux = AuxKSelector(dead_mask, k_aux) if (dead_mask is not None and k_aux > 0) else None

    @property
    def n_out(self) -> int:
        return 2 if self.aux is not None else 1

    def begin(self, B: int, n: int, device: torch.device) -> None:
        self.k = min(self.k, n)
        self.parts: list[tuple[Tensor, Tensor]] = []
        if self.aux is not None:
            self.aux.begin(n, device)

    def chunk(self, h: Tensor) -> None:
        self.parts.append(topk_rows(h, self.k))
        if self.aux is not None:
            self.aux.chunk(h)

    def finish(self, h_rows) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        vals = [torch.cat([p[0] for p in self.parts])]
        idx = [torch.cat([p[1] for p in self.parts])]
        if self.aux is not None:
            av, ai = self.aux.result()
            vals.append(av)
            idx.append(ai)
        return vals, idx, None


class BatchTopKSelector:
    """The top ``B·k`` ReLU'd pre-activations of the whole batch (Bussmann, Leask & Nanda 2024),
    computed chunk by chunk, exactly.

    Each row keeps its top ``width`` candidates (start: ``cand_factor · k``). The batch threshold θ is
    the ``B·k``-th largest candidate. A row whose smallest candidate is still ≥ θ may have lost
    entries to the cut, so its pre-activations are recomputed with a four times wider candidate set,
    and θ is recomputed, until no row is in doubt. The result is the reference's selection (up to the
    choice among values equal to θ), padded into ``[B, K]`` with zeros (``K`` = most entries any row
    keeps). Checking for doubtful rows reads one flag back from the device each step.
    """

    def __init__(self, k: int, cand_factor: int = 4, dead_mask: Tensor | None = None, k_aux: int = 0):
        self.k = k
        self.cand_factor = cand_factor
        self.aux = AuxKSelector(dead_mask, k_aux) if (dead_mask is not None and k_aux > 0) else None

    @property
    def n_out(self) -> int:
        return 2 if self.aux is not None else 1

    def begin(self, B: int, n: int, device: torch.device) -> None:
        self.B, self.n = B, n
        self.width = min(n, self.cand_factor * self.k)
        self.parts: list[tuple[Tensor, Tensor]] = []
        if self.aux is not None:
            self.aux.begin(n, device)

    def chunk(self, h: Tensor) -> None:
        self.parts.append(topk_rows(h, self.width))
        if self.aux is not None:
            self.aux.chunk(h)

    def finish(self, h_rows) -> tuple[list[Tensor], list[Tensor], Tensor]:
        vals = torch.cat([p[0] for p in self.parts])
        idx = torch.cat([p[1] for p in self.parts])
        B, n = self.B, self.n
        keep_n = min(B * self.k, B * n)
        row_width = torch.full((B,), vals.shape[1], device=vals.device)
        while True:
            pos = vals.clamp_min(0)
            theta = pos.reshape(-1).topk(keep_n, sorted=False).values.min()
            doubt = (pos.amin(1) >= theta) & (theta > 0) & (row_width < n)
            if not bool(doubt.any()):
                break
            rows = torch.nonzero(doubt).flatten()
            wider = min(n, 4 * vals.shape[1])
            new_v = vals.new_full((B, wider), float("-inf"))
            new_i = idx.new_zeros(B, wider)
            new_v[:, : vals.shape[1]] = vals
            new_i[:, : idx.shape[1]] = idx
            rv, ri = topk_rows(h_rows(rows), wider)
            new_v[rows], new_i[rows] = rv, ri
            row_width[rows] = wider
            vals, idx = new_v, new_i
        # Exactly keep_n entries: everything above θ, then as many entries equal to θ as are needed.
        above = pos > theta
        if bool(theta > 0):
            tied = pos == theta
            need = keep_n - above.sum()
            rank = tied.reshape(-1).cumsum(0).view_as(tied)
            keep = above | (tied & (rank <= need))
        else:
            keep = above  # θ = 0: the reference's remaining picks are zeros, which add nothing
        K = max(1, int(keep.sum(1).max()))
        order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]
        kept = keep.gather(1, order)
        out_v = torch.where(kept, vals.gather(1, order), torch.zeros((), dtype=vals.dtype, device=vals.device))
        out_i = torch.where(kept, idx.gather(1, order), torch.zeros((), dtype=idx.dtype, device=idx.device))
        if self.aux is not None:
            av, ai = self.aux.result()
            return [out_v, av], [out_i, ai], theta
        return [out_v], [out_i], theta
