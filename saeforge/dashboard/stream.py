"""The dashboard's streaming state: every latent's top examples, quantile-band samples, histogram, density.

All per-latent state is a handful of dense tensors updated with whole-tensor operations; nothing loops over
latents in Python. Activations arrive sparse -- entries ``(row, latent, value)`` of the non-zero codes -- so a
batch costs work in proportion to its firings, not to rows x latents.

* **Top-k examples** and **band samples** both live in a :class:`SlotSet`: ``S`` unordered slots per latent,
  each with a key, the activation, where it came from and its ±``context``-token window (token ids and the
  latent's activation on each). Per batch, entries not above their latent's weakest slot are dropped, the
  rest are ranked within their latent by one sort (:func:`per_latent_top`) and merged with the slots by one
  ``topk`` over the concatenation; the losers' slots take the winners, so only rows that actually enter the
  set have their windows gathered.
  For top-k the key is the activation. For band samples the key is an independent U(0, 1) tag per firing row:
  the rows holding the ``S`` largest tags of all rows seen are a uniform sample without replacement of the
  latent's firing rows (the "random tags" form of reservoir sampling; Efraimidis & Spirakis, "Weighted random
  sampling with a reservoir", IPL 2006, with equal weights), and the top-S of a union is the top-S of the parts'
  top-S, so merging batch by batch is exact. At the end the sample is split into activation-quantile bands
  whose edges come from the histogram (stratifying a uniform sample after the fact).
* **Histograms** count non-zero activations in fixed log-spaced bins (``BINS_PER_DECADE`` per decade over
  [1e-5, 1e5]; values outside land in the end bins), so no range has to be guessed before the data is seen;
  :func:`linear_histogram` re-bins them linearly over [0, max] for display, and :func:`quantile_edges` reads
  quantiles from them.
* **Windows** are the neighbouring rows of the activation stream that belong to the same document: the rows
  of a cache (or of text run through the model) are the kept tokens in document order, so rows r-10..r+10 of
  one document are the text around row r, and each one's activation is the SAE's output on that very row.
  Rows are processed with a halo of ``context`` rows on each side carried across chunk boundaries.

The state is a set of tensors (``state_dict``/``load_state_dict``) that build.py checkpoints.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

EMPTY = -1.0  # key of an empty slot
NONE = -2.0  # key of a non-firing candidate: it can never displace even an empty slot
LOG_LO, LOG_HI, BINS_PER_DECADE = -5, 5, 48
N_LOG_BINS = (LOG_HI - LOG_LO) * BINS_PER_DECADE


# ---------------------------------------------------------------------------------------------- streaming state
class SlotSet:
    """``S`` slots per latent: key, activation, row / doc / pos of the example and its token window."""

    FIELDS = ("key", "val", "row", "doc", "pos", "tok", "act")

    def __init__(self, m: int, S: int, C: int, device: torch.device):
        self.S = S
        self.key = torch.full((m, S), EMPTY, device=device)
        self.val = torch.zeros((m, S), device=device)
        self.row = torch.full((m, S), -1, dtype=torch.long, device=device)
        self.doc = torch.full((m, S), -1, dtype=torch.long, device=device)
        self.pos = torch.full((m, S), -1, dtype=torch.long, device=device)
        self.tok = torch.full((m, S, C), -1, dtype=torch.int32, device=device)
        self.act = torch.zeros((m, S, C), device=device)

    def offer(self, ckey: Tensor, cval: Tensor, clocal: Tensor, window: Callable[[Tensor, Tensor], dict]) -> int:
        """Merge candidates (``[m, c]`` keys, values, local row indices); returns how many entered."""
        allk = torch.cat([self.key, ckey], 1)
        sel = allk.topk(self.S, dim=1, sorted=False).indices
        keep = torch.zeros_like(allk, dtype=torch.bool).scatter_(1, sel, True)
        new = keep[:, self.S:]
        n_new = int(new.sum())
        if n_new == 0:
            return 0
        # Per latent, #evicted old slots == #entering candidates, and boolean indexing walks both masks in
        # row-major order, so the k-th evicted slot and the k-th entering candidate belong to the same latent.
        evicted = ~keep[:, : self.S]
        self.key[evicted] = ckey[new]
        self.val[evicted] = cval[new]
        lat = new.nonzero(as_tuple=True)[0]
        for k, v in window(lat, clocal[new]).items():
            getattr(self, k)[evicted] = v
        return n_new

    def sorted(self) -> dict[str, Tensor]:
        """All fields with each latent's slots ordered by descending key (empty slots last)."""
        order = self.key.argsort(dim=1, descending=True, stable=True)
        out = {}
        for k in self.FIELDS:
            t = getattr(self, k)
            idx = order if t.dim() == 2 else order.unsqueeze(-1).expand_as(t)
            out[k] = t.gather(1, idx)
        return out


def per_latent_top(lat: Tensor, key: Tensor, m: int, c: int) -> tuple[Tensor, Tensor]:
    """The ``c`` largest keys of each latent among sparse entries ``(lat, key)`` (keys >= 0): ``(keys [m, c],
    entry index [m, c])``, padded with key ``NONE``. One sort, no loop over latents: non-negative float32 keys
    order like their bit patterns, so ``lat * 2^31 + (2^31 - 1 - bits(key))`` sorts by latent, then key descending.
    """
    bits = key.float().contiguous().view(torch.int32).long()
    order = (lat * 2**31 + (2**31 - 1 - bits)).argsort()
    lat_s = lat[order]
    counts = torch.bincount(lat_s, minlength=m)
    rank = torch.arange(lat_s.numel(), device=lat.device) - (counts.cumsum(0) - counts)[lat_s]
    ok = rank < c
    ck = torch.full((m, c), NONE, dtype=key.dtype, device=key.device)
    ci = torch.zeros((m, c), dtype=torch.long, device=key.device)
    ck[lat_s[ok], rank[ok]] = key[order[ok]]
    ci[lat_s[ok], rank[ok]] = order[ok]
    return ck, ci


class LatentStats:
    """Streaming per-latent statistics over rows of SAE activations (see the module docstring).

    ``update`` takes the activations in sparse form -- entries ``(row, latent, value)`` with value > 0 -- so
    its cost grows with the number of firings, not with rows x latents.
    """

    def __init__(self, d_sae: int, top_k: int = 20, context: int = 10, reservoir: int = 100, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.m, self.context = d_sae, context
        C = 2 * context + 1
        self.offsets = torch.arange(-context, context + 1, device=self.device)
        self.top = SlotSet(d_sae, top_k, C, self.device)
        self.res = SlotSet(d_sae, reservoir, C, self.device)
        self.hist = torch.zeros((d_sae, N_LOG_BINS), dtype=torch.long, device=self.device)
        self.fires = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.n_rows = 0
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def update(self, n_rows: int, r: Tensor, lat: Tensor, v: Tensor, lo: int, hi: int,
               tok: Tensor, doc: Tensor, pos: Tensor, row: Tensor) -> None:
        """Count rows ``lo:hi`` of a block of ``n_rows`` rows whose firings are the entries ``(r, lat, v)``
        (v > 0, sorted by ``r * d_sae + lat``); the other rows are halo, used only for windows."""
        m = self.m
        c = (r >= lo) & (r < hi)
        rc, lc, vc = r[c], lat[c], v[c]
        self.n_rows += hi - lo
        if lc.numel() == 0:
            return
        self.fires += torch.bincount(lc, minlength=m)
        self.act_sum.index_add_(0, lc, vc.double())
        b = ((vc.log10() - LOG_LO) * BINS_PER_DECADE).floor_().clamp_(0, N_LOG_BINS - 1).long()
        self.hist.view(-1).index_add_(0, lc * N_LOG_BINS + b, torch.ones_like(b))
        ekey = r * m + lat

        def window(wl: Tensor, local: Tensor) -> dict[str, Tensor]:
            nbr = local[:, None] + self.offsets
            nbr_c = nbr.clamp(0, n_rows - 1)
            ok = (nbr >= 0) & (nbr < n_rows) & (doc[nbr_c] == doc[local][:, None])
            q = nbr_c * m + wl[:, None]
            at = torch.searchsorted(ekey, q).clamp_(max=ekey.numel() - 1)
            hit = ok & (ekey[at] == q)
            return {"row": row[local], "doc": doc[local], "pos": pos[local],
                    "tok": torch.where(ok, tok[nbr_c], -1).to(torch.int32),
                    "act": torch.where(hit, v[at], 0.0)}

        self._offer(self.top, lc, vc, vc, rc, window)
        tags = torch.rand(vc.shape, generator=self.gen, device=self.device)
        self._offer(self.res, lc, tags, vc, rc, window)

    def _offer(self, slots: SlotSet, lat: Tensor, key: Tensor, val: Tensor, rows: Tensor, window: Callable) -> None:
        """Offer entries to ``slots``; those not above their latent's weakest slot are dropped first (after
        the first batches almost all are), so the sort and the merge only see real contenders."""
        keep = key > slots.key.min(1).values[lat]
        if not bool(keep.any()):
            return
        lat, key, val, rows = lat[keep], key[keep], val[keep], rows[keep]
        c = min(slots.S, int(torch.bincount(lat, minlength=self.m).max()))
        ck, ci = per_latent_top(lat, key, self.m, c)
        slots.offer(ck, val[ci], rows[ci], window)

    # ---- persistence ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"top.{k}": getattr(self.top, k) for k in SlotSet.FIELDS}
        sd.update({f"res.{k}": getattr(self.res, k) for k in SlotSet.FIELDS})
        sd.update(hist=self.hist, fires=self.fires, act_sum=self.act_sum, rng=self.gen.get_state(),
                  n_rows=torch.tensor([self.n_rows], dtype=torch.long))
        return sd

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        for k in SlotSet.FIELDS:
            setattr(self.top, k, sd[f"top.{k}"].to(self.device))
            setattr(self.res, k, sd[f"res.{k}"].to(self.device))
        self.hist, self.fires = sd["hist"].to(self.device), sd["fires"].to(self.device)
        self.act_sum = sd["act_sum"].to(self.device)
        self.gen.set_state(sd["rng"].cpu())
        self.n_rows = int(sd["n_rows"][0])


# ---------------------------------------------------------------------------------------------- histograms
def _log_edges(device: torch.device | None = None) -> Tensor:
    return 10.0 ** (LOG_LO + torch.arange(N_LOG_BINS + 1, dtype=torch.float64, device=device) / BINS_PER_DECADE)


def _effective_edges(hi: Tensor) -> Tensor:
    """Per-latent fine-bin edges [m, NB+1]: bin 0 starts at 0 (it holds everything below 1e-5) and every edge
    is capped at the latent's true maximum ``hi`` (so the last occupied bin ends exactly there)."""
    e = _log_edges(hi.device).expand(hi.shape[0], -1).clone()
    e[:, 0] = 0.0
    e[:, -1] = torch.maximum(e[:, -1], hi.double())
    return torch.minimum(e, hi.double()[:, None])


def linear_histogram(hist: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Re-bin fine log-histograms ``[m, NB]`` into ``bins`` equal bins over ``[0, hi]`` per latent.

    Counts inside a fine bin are taken as spread uniformly over it (the CDF is linear within a bin), so the
    result is exact up to one fine bin (a ratio of 10^(1/48) ≈ 1.049) and the totals are preserved.
    """
    m = hist.shape[0]
    h = hist.double()
    edges = _effective_edges(hi)
    cum = torch.cat([torch.zeros(m, 1, dtype=torch.float64, device=h.device), h.cumsum(1)], 1)
    x = hi.double()[:, None] * torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=h.device)
    b = (torch.searchsorted(edges.contiguous(), x.contiguous(), right=True) - 1).clamp(0, N_LOG_BINS - 1)
    lo_e, hi_e = edges.gather(1, b), edges.gather(1, b + 1)
    frac = ((x - lo_e) / (hi_e - lo_e).clamp_min(1e-300)).clamp(0, 1)
    cdf = cum.gather(1, b) + h.gather(1, b) * frac
    cdf[:, -1] = cum[:, -1]
    return cdf.diff(dim=1)


def quantile_edges(hist: Tensor, hi: Tensor, n_bands: int) -> Tensor:
    """Activation values at quantiles 0, 1/n, ..., 1 of each latent's non-zero activations ``[m, n+1]``
    (linear interpolation inside the fine bin holding the quantile; the last edge is the maximum)."""
    m = hist.shape[0]
    h = hist.double()
    edges = _effective_edges(hi)
    cum = h.cumsum(1)
    total = cum[:, -1:]
    t = total * torch.linspace(0, 1, n_bands + 1, dtype=torch.float64, device=h.device)
    b = torch.searchsorted(cum.contiguous(), t.contiguous(), right=False).clamp(0, N_LOG_BINS - 1)
    before = torch.cat([torch.zeros(m, 1, dtype=torch.float64, device=h.device), cum[:, :-1]], 1).gather(1, b)
    frac = ((t - before) / h.gather(1, b).clamp_min(1e-300)).clamp(0, 1)
    q = edges.gather(1, b) + frac * (edges.gather(1, b + 1) - edges.gather(1, b))
    q[:, 0] = torch.where(total[:, 0] > 0, q[:, 0], 0.0)
    q[:, -1] = hi.double()
    return q


# ---------------------------------------------------------------------------------------------- row sources
class Halo:
    """Feeds a stream of row chunks to ``process`` in steps of ``step`` rows (the last may be shorter), each
    step carrying up to ``W`` rows of context on either side (rows already processed / not yet processed)."""

    KEYS = ("x", "tok", "doc", "pos", "row")

    def __init__(self, W: int, step: int, process: Callable[..., None]):
        self.W, self.step, self.process = W, step, process
        self.buf: dict[str, Tensor] | None = None
        self.left = 0  # rows at the front of buf that were processed already
        self.rows_in = 0

    def feed(self, chunk: dict[str, Tensor] | None, final: bool = False) -> None:
        if chunk is not None and chunk["x"].shape[0]:
            n = chunk["x"].shape[0]
            chunk = {**chunk, "row": torch.arange(self.rows_in, self.rows_in + n)}
            self.rows_in += n
            self.buf = chunk if self.buf is None else {k: torch.cat([self.buf[k], chunk[k]]) for k in self.KEYS}
        if self.buf is None:
            return
        L = self.buf["x"].shape[0]
        # Only whole steps until the end: step boundaries fall every `step` rows of the stream whatever the
        # chunking, so a cache (shards) and text (forward batches) give identical steps, tags and results.
        end = L if final else self.left + max(0, L - self.W - self.left) // self.step * self.step
        a = self.left
        while a < end:
            b = min(a + self.step, end)
            s, e = max(a - self.W, 0), min(b + self.W, L)
            self.process({k: v[s:e] for k, v in self.buf.items()}, a - s, b - s)
            a = b
        k = max(end - self.W, 0)
        self.buf = {key: v[k:] for key, v in self.buf.items()}
        self.left = end - k

    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"halo.{k}": v for k, v in (self.buf or {}).items()}
        sd["halo.meta"] = torch.tensor([self.left, self.rows_in], dtype=torch.long)
        return sd

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self.left, self.rows_in = (int(v) for v in sd["halo.meta"])
        buf = {k: sd[f"halo.{k}"] for k in self.KEYS if f"halo.{k}" in sd}
        self.buf = buf if buf else None
