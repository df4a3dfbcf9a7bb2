"""The dashboard's one streaming pass: every latent's top examples, quantile-band samples, histogram, density.

All per-latent state is a handful of dense tensors updated with whole-tensor operations; nothing loops over
latents in Python, so one pass costs a few dense ops per batch whatever the SAE's width.

* **Top-k examples** and **band samples** both live in a :class:`SlotSet`: ``S`` unordered slots per latent,
  each with a key, the activation, where it came from and its ±``context``-token window (token ids and the
  latent's activation on each). Per batch, each latent's best ``S`` candidates (``torch.topk`` over the batch
  rows) are merged with its slots by one ``topk`` over the concatenation; the losers' slots take the winners,
  so only the rows that actually enter the set have their windows gathered.
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

The pass is resumable: every ``checkpoint_rows`` rows the whole state (and the halo, and the random
generator) is written atomically to ``OUT/.build/state.safetensors``; a rerun with the same settings continues
from there and ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from saeforge.config import JsonConfig
from saeforge.errors import SaeforgeError
from saeforge.io import save_safetensors_atomic

EMPTY = -1.0  # key of an empty slot
NONE = -2.0  # key of a non-firing candidate: it can never displace even an empty slot
LOG_LO, LOG_HI, BINS_PER_DECADE = -5, 5, 48
N_LOG_BINS = (LOG_HI - LOG_LO) * BINS_PER_DECADE
STATE_FILE = "state.safetensors"


@dataclass
class DashboardConfig(JsonConfig):
    """What to build. Everything except ``out``, ``device``, ``explanations`` and ``progress`` knobs decides
    the streamed statistics; a rerun with other values of those fields starts the pass afresh."""

    sae: str
    data: str
    out: str
    model: str | None = None  # default: the SAE's cfg.model, or the cache manifest's model
    tokenizer: str | None = None
    hook: str | None = None  # default: the SAE's input hook
    sae_format: str | None = None  # default: detected (saeforge.formats.load_sae)
    explanations: str | None = None  # eval.json / n2g JSON with {"explanations": {id: {...}}}
    top_k: int = 20
    context: int = 10  # tokens shown on each side of an example
    n_bands: int = 10
    per_band: int = 5
    reservoir: int | None = None  # band sample size per latent; default 2 * n_bands * per_band
    hist_bins: int = 40  # bins of the displayed activation and logit histograms
    n_logits: int = 10
    n_neighbors: int = 10
    max_tokens: int | None = None
    context_len: int = 128  # packing, for text data
    batch_contexts: int = 32
    text_field: str = "text"
    split: str = "train"
    shard_size: int = 16  # latents per data shard of the site
    checkpoint_rows: int = 262144
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("top_k", "n_bands", "per_band", "hist_bins", "n_logits", "shard_size", "context_len",
                     "batch_contexts", "checkpoint_rows"):
            if getattr(self, name) < 1:
                raise SaeforgeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context < 0 or self.n_neighbors < 0:
            raise SaeforgeError("context and n_neighbors must be >= 0")
        if self.reservoir is not None and self.reservoir < self.per_band:
            raise SaeforgeError(f"reservoir={self.reservoir} must be at least per_band={self.per_band}")

    @property
    def reservoir_size(self) -> int:
        return self.reservoir or 2 * self.n_bands * self.per_band

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("out", "device", "explanations", "hist_bins", "n_logits", "n_neighbors", "shard_size",
                  "checkpoint_rows", "n_bands", "per_band"):
            d.pop(k)
        d["reservoir"] = self.reservoir_size
        return d


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
    """The ``c`` largest keys of each latent among sparse entries ``(lat, key)``: ``(keys [m, c], entry
    index [m, c])``, padded with key ``NONE`` (two sorts of the entries, no loop over latents)."""
    order = key.argsort(descending=True)
    order = order[lat[order].argsort(stable=True)]  # by latent, then by key descending
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

        ck, ci = per_latent_top(lc, vc, m, self.top.S)
        self.top.offer(ck, ck, rc[ci], window)
        tags = torch.rand(vc.shape, generator=self.gen, device=self.device)
        ck, ci = per_latent_top(lc, tags, m, self.res.S)
        self.res.offer(ck, vc[ci], rc[ci], window)

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
    """Feeds a stream of row chunks to ``process`` in steps of at most ``step`` rows, each step carrying up to
    ``W`` rows of context on either side (rows already processed / rows not yet processed)."""

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
        end = L if final else max(self.left, L - self.W)
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


def _fingerprint(sae: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_any_sae(path: str, fmt: str | None = None, device: str | torch.device = "cpu"):
    """Any SAE saeforge reads (``saeforge.formats.load_sae``), else a native folder (``SAE.load``)."""
    try:
        from saeforge.formats import load_sae
    except ImportError:
        load_sae = None
    if load_sae is not None:
        return load_sae(path, format=fmt, device=device)
    from saeforge.sae.base import SAE

    return SAE.load(path, device=device)


@dataclass
class Source:
    """Where rows come from: ``chunks(skip)`` yields ``{"x", "tok", "doc", "pos"}`` dicts in stream order."""

    kind: str  # "cache" | "text"
    describe: dict[str, Any]
    total_rows: int | None
    chunks: Callable[[int], Iterator[dict[str, Tensor]]]
    loaded: Any  # LoadedModel (tokenizer + unembedding)


def open_source(cfg: DashboardConfig, sae: Any, hook: str, device: torch.device) -> Source:
    from saeforge.models import load_model

    data = Path(cfg.data)
    if data.is_dir() and (data / "manifest.json").exists():
        from saeforge.activations.cache import ActivationCache

        cache = ActivationCache(data)
        if hook not in cache.d:
            raise SaeforgeError(f"cache {data} has no hook {hook!r} (it has {cache.hooks}); pass --hook or harvest it")
        mcfg = cache.manifest.get("config", {})
        spec = cfg.model or mcfg.get("model") or sae.cfg.model
        loaded = load_model(spec, tokenizer=cfg.tokenizer or mcfg.get("tokenizer"), device=device)
        limit = cfg.max_tokens

        def chunks(skip: int) -> Iterator[dict[str, Tensor]]:
            seen = sum(cache.shard_rows(i) for i in range(min(skip, cache.n_shards)))
            for i in range(skip, cache.n_shards):
                if limit is not None and seen >= limit:
                    return
                s = cache.shard(i, [hook])
                n = s["token_id"].shape[0] if limit is None else min(s["token_id"].shape[0], limit - seen)
                seen += n
                yield {"x": s[f"acts.{hook}"][:n].float(), "tok": s["token_id"][:n].long(),
                       "doc": s["doc"][:n].long(), "pos": s["pos"][:n].long()}

        total = cache.n_tokens if limit is None else min(cache.n_tokens, limit)
        desc = {"cache": str(data), "harvest": mcfg}
        return Source("cache", desc, total, chunks, loaded)

    from saeforge.activations.cache import context_batches, forward_rows
    from saeforge.hooks import resolve_hook

    spec = cfg.model or sae.cfg.model
    if not spec:
        raise SaeforgeError(f"the SAE names no model and {cfg.data} is text; pass --model (a .bin, folder or hub id)")
    loaded = load_model(spec, tokenizer=cfg.tokenizer, device=device)
    hp = resolve_hook(loaded, hook)

    def text_chunks(skip: int) -> Iterator[dict[str, Tensor]]:
        batches = context_batches(loaded.tokenizer, cfg.data, context_len=cfg.context_len,
                                  batch_size=cfg.batch_contexts, text_field=cfg.text_field, split=cfg.split,
                                  max_tokens=cfg.max_tokens)
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            r = forward_rows(loaded.model, [hp], batch, device)
            yield {"x": r[f"acts.{hook}"].float(), "tok": r["token_id"].long(), "doc": r["doc"], "pos": r["pos"].long()}

    desc = {"text": cfg.data, "model": str(spec), "context_len": cfg.context_len}
    return Source("text", desc, cfg.max_tokens, text_chunks, loaded)


# ---------------------------------------------------------------------------------------------- the pass
def sparse_encoder(sae: Any) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``x -> (row, latent, value)`` of the non-zero activations, sorted by (row, latent).

    Uses the SAE's own ``encode_sparse`` (TopK: no dense [rows, d_sae] code is ever built) when the class
    that defines it also defines how ``encode``/``activate`` work, else the dense ``encode``.
    """
    cls = type(sae)

    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in k.__dict__)

    if hasattr(cls, "encode_sparse") and all(issubclass(owner("encode_sparse"), owner(n)) for n in ("encode", "activate")):
        m = sae.cfg.d_sae

        def enc_sparse(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            vals, idx = sae.encode_sparse(x)
            k = vals.shape[-1]
            r = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
            lat, v = idx.reshape(-1), vals.reshape(-1).float()
            keep = v > 0
            r, lat, v = r[keep], lat[keep], v[keep]
            order = (r * m + lat).argsort()
            return r[order], lat[order], v[order]

        return enc_sparse

    def enc_dense(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = sae.encode(x).float()
        r, lat = (a > 0).nonzero(as_tuple=True)
        return r, lat, a[r, lat]

    return enc_dense


def step_rows(d_sae: int) -> int:
    """Rows per compute step: keep the dense [rows, d_sae] activations near 32M floats (128 MB)."""
    return int(max(256, min(8192, 2**25 // max(d_sae, 1))))


def run_pass(cfg: DashboardConfig, sae: Any, source: Source, state_dir: Path, progress: bool = True) -> LatentStats:
    """Stream every row once through the SAE into a :class:`LatentStats`, checkpointing as it goes."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    device = next(sae.parameters()).device
    stats = LatentStats(sae.cfg.d_sae, cfg.top_k, cfg.context, cfg.reservoir_size, cfg.seed, device)

    encode = sparse_encoder(sae)

    def process(rows: dict[str, Tensor], lo: int, hi: int) -> None:
        with torch.no_grad():
            r, lat, v = encode(rows["x"].to(device))
        stats.update(rows["x"].shape[0], r, lat, v, lo, hi, *(rows[k].to(device) for k in ("tok", "doc", "pos", "row")))

    halo = Halo(cfg.context, step_rows(sae.cfg.d_sae), process)
    state_path = state_dir / STATE_FILE
    identity = {"config": cfg.identity(), "sae": _fingerprint(sae)}
    chunks_done = 0
    if state_path.exists():
        from safetensors import safe_open

        with safe_open(str(state_path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
        if meta["identity"] != identity:
            raise SaeforgeError(f"{state_dir} holds a build with other settings or another SAE; pass --overwrite "
                                "or pick a new --out")
        sd = load_file(str(state_path))
        stats.load_state_dict(sd)
        halo.load_state_dict(sd)
        chunks_done = meta["chunks_done"]
        if meta.get("complete"):
            return stats

    def checkpoint(complete: bool) -> None:
        sd = {**stats.state_dict(), **halo.state_dict()}
        meta = {"identity": identity, "chunks_done": chunks_done, "complete": complete}
        save_safetensors_atomic(state_path, sd, metadata={"meta": json.dumps(meta)})

    bar = tqdm(total=source.total_rows, initial=halo.rows_in, unit="tok", unit_scale=True, desc="dashboard",
               disable=not progress, dynamic_ncols=True)
    since = 0
    try:
        for chunk in source.chunks(chunks_done):
            halo.feed(chunk)
            chunks_done += 1
            n = chunk["x"].shape[0]
            bar.update(n)
            since += n
            if since >= cfg.checkpoint_rows:
                checkpoint(False)
                since = 0
        halo.feed(None, final=True)
    finally:
        bar.close()
    if stats.n_rows == 0:
        raise SaeforgeError(f"{cfg.data} gave no rows; use more text or a complete activation cache")
    checkpoint(True)
    return stats


def build_dashboard(cfg: DashboardConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Run the streaming pass (resuming a checkpoint if there is one) and write the static site to ``cfg.out``."""
    import shutil

    from saeforge.dashboard import logits as lg
    from saeforge.dashboard.site import load_explanations, write_site
    from saeforge.device import resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    state_dir = out / ".build"
    if overwrite and state_dir.exists():
        shutil.rmtree(state_dir)
    explanations = load_explanations(cfg.explanations) if cfg.explanations else {}
    sae = load_any_sae(cfg.sae, cfg.sae_format, device).eval()
    hook = cfg.hook or sae.cfg.hook
    if not hook:
        raise SaeforgeError("the SAE names no input hook; pass --hook (e.g. resid_post.2)")
    source = open_source(cfg, sae, hook, device)
    state_dir.mkdir(parents=True, exist_ok=True)
    stats = run_pass(cfg, sae, source, state_dir, progress=progress)
    W_dec = sae.W_dec.detach().float()
    effects = lg.logit_effects_for_model(W_dec, source.loaded, k=cfg.n_logits, bins=cfg.hist_bins)
    neighbors = lg.decoder_neighbors(W_dec, cfg.n_neighbors) if cfg.n_neighbors else None
    info = {"sae": cfg.sae, "arch": sae.cfg.arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "hook": hook, "target_hook": sae.cfg.target_hook, "transcoder": bool(sae.cfg.is_transcoder),
            "model": str(source.loaded.spec), "source": source.describe, "n_tokens": stats.n_rows,
            "settings": cfg.identity()}
    write_site(out, cfg, stats, effects, neighbors, explanations, source.loaded.tokenizer, info)
    return out
