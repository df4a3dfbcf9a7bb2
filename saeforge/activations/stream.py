"""Activation streams: the one interface the trainer reads activations through.

A stream yields :class:`ActivationBatch` objects -- float32 rows for each hook, plus the token id, the
document and the position each row came from -- drawn at random from a bounded :class:`ShuffleBuffer`.
Two sources feed it:

* :class:`CachedStream` reads a harvested cache (``saeforge harvest``) shard by shard;
* :class:`LiveStream` runs the model on text as it goes, with no cache at all.

Given the same model, data and packing settings both produce the same multiset of rows per epoch.
All randomness comes from ``torch.Generator`` objects seeded with ``(seed, epoch)``, so a stream is
reproducible, and ``iterate(skip_batches=k)`` resumes a run exactly: it replays the first ``k`` batches
without handing them out (whole epochs are skipped without any work, since each epoch starts afresh).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from saeforge import distributed as dist
from saeforge.activations.cache import MANIFEST, ActivationCache, forward_rows
from saeforge.config import JsonConfig
from saeforge.data.batches import context_batches
from saeforge.data.fingerprint import data_fingerprint
from saeforge.data.packing import ContextBatch
from saeforge.device import resolve_device
from saeforge.distributed import split_bounds
from saeforge.errors import SaeforgeError
from saeforge.hooks import resolve_hook
from saeforge.models import check_context_len, load_model

META_KEYS = ("token_id", "doc", "pos")


@dataclass
class ActivationBatch:
    """One training batch: ``acts[hook]`` is float32 [B, d] on the stream's device; metadata is int64 [B]."""

    acts: dict[str, torch.Tensor]
    token_id: torch.Tensor | None = None
    doc: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    global_rows: int | None = None  # rows of the global batch this one is a part of (None: this whole batch)

    def __len__(self) -> int:
        return next(iter(self.acts.values())).shape[0]


@runtime_checkable
class ActivationStream(Protocol):
    """What the trainer consumes: hook names and widths, a replayable batch iterator, and what decides the
    batches (compared when a run resumes; ``None`` when the stream cannot say)."""

    hooks: list[str]
    d: dict[str, int]

    def iterate(self, skip_batches: int = 0) -> Iterator[ActivationBatch]: ...

    def identity(self) -> dict[str, Any] | None: ...

    def __iter__(self) -> Iterator[ActivationBatch]: ...


class Stream:
    """A base for :class:`ActivationStream` implementations: subclasses set ``hooks`` and ``d`` and define
    ``iterate``; ``identity`` defaults to ``None`` (a resumed run is then not checked against the data)."""

    hooks: list[str]
    d: dict[str, int]

    def iterate(self, skip_batches: int = 0) -> Iterator[ActivationBatch]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any] | None:
        return None

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.iterate(0)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A distinct, reproducible stream of random numbers per (seed, epoch).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class ShuffleBuffer:
    """A fixed-capacity pool of rows; ``pop`` removes a uniformly random subset of the resident rows.

    Rows are kept in preallocated tensors (one per key, allocated on the first ``push``), so memory is
    ``capacity`` rows no matter how much data flows through. A pop picks ``b`` distinct slots uniformly
    at random and fills the holes with the rows from the tail (swap-remove), keeping the residents
    contiguous in ``[0, size)``. Sampling uses the given CPU generator, so the row order is
    reproducible and independent of the device the rows live on.
    """

    def __init__(self, capacity: int, generator: torch.Generator, device: str | torch.device = "cpu"):
        if capacity < 1:
            raise SaeforgeError(f"shuffle buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.device = torch.device(device)
        self.size = 0
        self._store: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def free(self) -> int:
        return self.capacity - self.size

    def push(self, chunk: dict[str, torch.Tensor]) -> None:
        """Copy all rows of ``chunk`` in; they must fit (``len <= free``)."""
        n = next(iter(chunk.values())).shape[0]
        if n > self.free:
            raise ValueError(f"push of {n} rows into a buffer with {self.free} free slots")
        if self._store is None:
            self._store = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=self.device)
                           for k, v in chunk.items()}
        for k, v in chunk.items():
            self._store[k][self.size:self.size + n] = v
        self.size += n

    def pop(self, batch_size: int, gather: bool = True) -> dict[str, torch.Tensor] | None:
        """Remove ``batch_size`` uniformly random resident rows; return them (or None with ``gather=False``,
        which advances the random state identically -- used to replay batches on resume)."""
        n, b = self.size, batch_size
        if b > n:
            raise ValueError(f"pop of {b} rows from a buffer holding {n}")
        assert self._store is not None
        idx = torch.randperm(n, generator=self.generator)[:b]
        out = None
        if gather:
            idx_d = idx.to(self.device)
            out = {k: v.index_select(0, idx_d) for k, v in self._store.items()}
        # Swap-remove: holes below n-b take the unpicked rows of the tail [n-b, n).
        picked_tail = torch.zeros(b, dtype=torch.bool)
        picked_tail[idx[idx >= n - b] - (n - b)] = True
        holes = idx[idx < n - b]
        if holes.numel():
            movers = torch.arange(n - b, n)[~picked_tail]
            holes_d, movers_d = holes.to(self.device), movers.to(self.device)
            for v in self._store.values():
                v[holes_d] = v[movers_d]
        self.size = n - b
        return out

    def flush(
        self, batch_size: int, gather: Callable[[], bool] = lambda: True
    ) -> Iterator[dict[str, torch.Tensor] | None]:
        """Empty the buffer in random batches (the last one may be smaller)."""
        while self.size:
            yield self.pop(min(batch_size, self.size), gather())

    def shuffle_chunks(
        self, chunks: Iterable[dict[str, torch.Tensor]], batch_size: int, gather: Callable[[], bool]
    ) -> Iterator[dict[str, torch.Tensor] | None]:
        """Stream chunks through the buffer: fill it, pop a batch whenever it is full, flush at the end.

        ``gather()`` is asked before each pop whether the batch is wanted (False while replaying).
        """
        if batch_size > self.capacity:
            raise SaeforgeError(
                f"batch size {batch_size} exceeds the shuffle buffer ({self.capacity} rows); raise shuffle_buffer"
            )
        for chunk in chunks:
            n = next(iter(chunk.values())).shape[0]
            off = 0
            while off < n:
                take = min(self.free, n - off)
                self.push({k: v[off:off + take] for k, v in chunk.items()})
                off += take
                if self.free == 0:
                    yield self.pop(batch_size, gather())
            del chunk  # let the source drop this chunk before it produces the next one
        yield from self.flush(batch_size, gather)


class _BufferedStream(Stream):
    """Shared epoch / replay / batching logic; subclasses provide the chunks of one epoch."""

    hooks: list[str]
    d: dict[str, int]

    def __init__(self, batch_size: int, shuffle_buffer: int, epochs: int | None, seed: int, device: Any):
        if batch_size < 1:
            raise SaeforgeError(f"batch_size must be positive, got {batch_size}")
        if epochs is not None and epochs < 1:
            raise SaeforgeError(f"epochs must be positive or None (forever), got {epochs}")
        self.batch_size = batch_size
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.epochs = epochs
        self.seed = seed
        self.device = resolve_device(device)

    def _n_rows(self) -> int | None:
        """Rows per epoch when known without a pass (lets ``iterate`` skip whole epochs for free)."""
        return None

    def _epoch_chunks(self, epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def batches_per_epoch(self) -> int | None:
        n = self._n_rows()
        return None if n is None else -(-n // self.batch_size)

    def _to_batch(self, rows: dict[str, torch.Tensor]) -> ActivationBatch:
        dev = self.device
        acts = {h: rows[f"acts.{h}"].to(dev, torch.float32, non_blocking=True) for h in self.hooks}
        meta = {k: rows[k].to(dev, torch.int64) for k in META_KEYS}
        return ActivationBatch(acts=acts, **meta)

    def iterate(self, skip_batches: int = 0) -> Iterator[ActivationBatch]:
        """Yield batches epoch after epoch (forever when ``epochs`` is None).

        The first ``skip_batches`` batches are replayed without being returned, so a resumed training
        run sees exactly the batches an uninterrupted one would have seen next.
        """
        per_epoch = self.batches_per_epoch()
        epoch = 0
        if per_epoch and skip_batches >= per_epoch:  # whole epochs: nothing to replay
            epoch, skip_batches = divmod(skip_batches, per_epoch)
        while self.epochs is None or epoch < self.epochs:
            g = _epoch_generator(self.seed, epoch)
            n_rows = self._n_rows()
            cap = self.shuffle_buffer if n_rows is None else max(self.batch_size, min(self.shuffle_buffer, n_rows))
            buf = ShuffleBuffer(cap, g, self.device)
            produced = 0
            for rows in buf.shuffle_chunks(self._epoch_chunks(epoch, g), self.batch_size,
                                           gather=lambda: skip_batches == 0):
                produced += 1
                if skip_batches:
                    skip_batches -= 1
                    continue
                yield self._to_batch(rows)
            if produced == 0:
                raise SaeforgeError(
                    f"{type(self).__name__} has no rows to give; point it at a non-empty cache or more text"
                )
            epoch += 1

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.iterate()


def _prefetched(load: Callable[[int], dict[str, torch.Tensor]], order: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``load(i)`` for ``i`` in ``order``, loading the next shard on a worker thread while the
    current one is consumed (I/O overlaps compute). At most two shards are alive at any time."""
    if not order:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saeforge-prefetch") as pool:
        future = pool.submit(load, order[0])
        for k in range(len(order)):
            chunk = future.result()
            future = pool.submit(load, order[k + 1]) if k + 1 < len(order) else None
            yield chunk
            del chunk


class CachedStream(_BufferedStream):
    """Rows of a harvested cache, shuffled: per epoch the shard order is a random permutation (seeded by
    ``(seed, epoch)``) and rows pass through a ShuffleBuffer. Memory: the buffer plus one shard (two
    with ``prefetch``: the one being consumed and the next), independent of the cache size. Rows are
    bit-exact copies of the cache, cast to float32."""

    def __init__(
        self,
        cache: str | Path | ActivationCache,
        batch_size: int = 4096,
        hooks: list[str] | None = None,
        shuffle_buffer: int = 262144,
        epochs: int | None = None,
        seed: int = 0,
        device: Any = "cpu",
        prefetch: bool = True,
    ):
        super().__init__(batch_size, shuffle_buffer, epochs, seed, device)
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
        self.hooks = self.cache.check_hooks(hooks)
        self.d = {h: self.cache.d[h] for h in self.hooks}
        self.prefetch = prefetch
        self.model_spec = self.cache.model_spec

    def identity(self) -> dict[str, Any]:
        """What decides the batches: the cache's contents (its shard checksums) and the shuffling settings."""
        return {"cache": self.cache.content_id(), "hooks": self.hooks, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "epochs": self.epochs, "seed": self.seed}

    def _n_rows(self) -> int:
        return self.cache.n_tokens

    def _epoch_chunks(self, epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(self.cache.n_shards, generator=generator).tolist()
        load = lambda i: self.cache.shard(i, self.hooks)  # noqa: E731
        if self.prefetch:
            yield from _prefetched(load, order)
        else:
            for i in order:
                yield load(i)


class LiveStream(_BufferedStream):
    """The same rows as a cache would hold, computed on the fly: text -> pack -> model forward -> buffer.

    Packing, batching and ``max_tokens`` follow :func:`saeforge.activations.cache.harvest` exactly, so a
    LiveStream and a CachedStream over a float32 harvest of the same data give the same rows per epoch
    (in a different order). Replaying ``skip_batches`` re-runs the forward passes it skips.
    """

    def __init__(
        self,
        model: Any,
        hooks: list[str],
        data: str,
        batch_size: int = 4096,
        context_len: int = 128,
        batch_contexts: int = 32,
        shuffle_buffer: int = 262144,
        seed: int = 0,
        text_field: str = "text",
        split: str = "train",
        device: Any = "cpu",
        epochs: int | None = None,
        keep_special: bool = False,
        max_tokens: int | None = None,
        tokenizer: str | None = None,
    ):
        super().__init__(batch_size, shuffle_buffer, epochs, seed, device)
        if isinstance(model, (str, Path)):
            model = load_model(str(model), tokenizer=tokenizer, device=self.device)
        self.loaded = model

        check_context_len(self.loaded, context_len)
        if not hooks:
            raise SaeforgeError("no hooks given to LiveStream; name at least one, e.g. resid_post.2")
        self.hook_points = [resolve_hook(self.loaded, h) for h in hooks]
        self.hooks = [hp.name for hp in self.hook_points]  # canonical names, as a cache stores them
        self.data, self.context_len, self.batch_contexts = data, context_len, batch_contexts
        self.text_field, self.split, self.keep_special, self.max_tokens = text_field, split, keep_special, max_tokens
        self.model_spec = str(self.loaded.spec)
        self.d = self._probe_widths()
        self._forward_group: Any = None

    def split_forward(self, group: Any) -> None:
        """Share the model's work with the processes of ``group`` (a :class:`saeforge.distributed.Group`):
        each runs every ``size``-th forward batch and the rows are exchanged, so every process still sees
        the whole, identical stream (the one a single process would produce) for a ``1/size`` of the forward
        passes. Every process of the group must iterate the stream in step (the trainer does)."""
        self._forward_group = group if group is not None and group.size > 1 else None

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_spec, "data": data_fingerprint(self.data), "hooks": self.hooks,
                "context_len": self.context_len, "batch_contexts": self.batch_contexts, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "epochs": self.epochs, "seed": self.seed,
                "keep_special": self.keep_special, "max_tokens": self.max_tokens, "text_field": self.text_field}

    def _model_device(self) -> torch.device:
        p = next(self.loaded.model.parameters(), None)
        return p.device if p is not None else self.device

    def _probe_widths(self) -> dict[str, int]:
        bos = self.loaded.tokenizer.bos_id
        tok = torch.tensor([[bos if bos is not None else 0, 0]])
        batch = ContextBatch(tok, torch.zeros_like(tok), torch.zeros_like(tok), torch.ones_like(tok, dtype=torch.bool))
        rows = forward_rows(self.loaded.model, self.hook_points, batch, self._model_device())
        return {h: int(rows[f"acts.{h}"].shape[-1]) for h in self.hooks}

    def _epoch_chunks(self, epoch: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        batches = context_batches(self.loaded.tokenizer, self.data, context_len=self.context_len,
                                  batch_size=self.batch_contexts, text_field=self.text_field, split=self.split,
                                  keep_special=self.keep_special, max_tokens=self.max_tokens)
        dev = self._model_device()
        g = self._forward_group
        if g is None:
            for batch in batches:
                yield forward_rows(self.loaded.model, self.hook_points, batch, dev)
            return

        done = False
        while not done:  # rounds of g.size forward batches; process r runs the r-th of each round
            mine = None
            for j in range(g.size):
                batch = next(batches, None)
                if batch is None:
                    done = True
                    break
                if j == g.rank:
                    mine = forward_rows(self.loaded.model, self.hook_points, batch, dev)
            for rows in dist.all_gather_object(mine, g):
                if rows is not None:
                    yield rows


class RankSlice(Stream):
    """Data parallelism at the stream: replica ``index`` of ``count`` gets rows ``[lo, hi)`` of every global
    batch of ``source`` (contiguous, deterministic, disjoint; the first ``B % count`` replicas get one row
    more). Every replica draws the same global batches (same seed), so the union over replicas of a step's
    rows is exactly the batch one process would train on, and ``iterate(skip_batches)`` resumes the same
    way for any number of replicas. ``global_rows`` on each batch is the global batch size.
    """

    def __init__(self, source: Any, index: int, count: int):
        if not 0 <= index < count:
            raise SaeforgeError(f"replica {index} of {count} does not exist")
        self.source, self.index, self.count = source, index, count
        self.hooks, self.d = source.hooks, source.d

    def __getattr__(self, name: str) -> Any:  # model_spec, batch_size, ... of the source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def identity(self) -> dict[str, Any] | None:
        return self.source.identity()

    def iterate(self, skip_batches: int = 0) -> Iterator[ActivationBatch]:
        for b in self.source.iterate(skip_batches):
            n = len(next(iter(b.acts.values())))
            lo, hi = split_bounds(n, self.index, self.count)
            meta = {k: (None if getattr(b, k, None) is None else getattr(b, k)[lo:hi]) for k in META_KEYS}
            yield ActivationBatch(acts={h: a[lo:hi] for h, a in b.acts.items()}, global_rows=n, **meta)

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.iterate()


class ShardSplit(Stream):
    """Data parallelism at the cache (``--dp-read disjoint``): replica ``index`` of ``count`` reads only its own
    shards of ``source`` (a :class:`CachedStream`) and yields its share of every global batch from them.

    Per epoch the shard order is the one-process permutation (seeded by ``(seed, epoch)``) and replica ``r``
    takes every ``count``-th shard starting at ``r``, so every shard of an epoch is read by exactly one replica
    (cache I/O per process drops ``count``-fold). Each replica shuffles through its own buffer (``1/count`` of
    ``shuffle_buffer``, seeded per replica) that carries rows over from one epoch into the next, so every batch
    is full: replica ``r`` yields the ``split_bounds(batch_size, r, count)`` rows of each step and
    ``global_rows`` is ``batch_size``. With finite ``epochs`` the stream ends after the steps every replica can
    fill (computed from the manifest, the same on every process). The batches then depend on ``count``: a
    checkpoint resumes only with the same number of replicas (the trainer refuses another).
    """

    def __init__(self, source: CachedStream, index: int, count: int):
        if not 0 <= index < count:
            raise SaeforgeError(f"replica {index} of {count} does not exist")
        n_shards = source.cache.n_shards
        if n_shards < count:
            raise SaeforgeError(f"--dp-read disjoint deals the cache's shards over the replicas but it has "
                                f"{n_shards} shards for {count} replicas; use --dp-read exact or a cache harvested "
                                "with a smaller --shard-tokens")
        if source.batch_size < count:
            raise SaeforgeError(f"--batch-size {source.batch_size} is smaller than the {count} replicas; raise it")
        self.source, self.index, self.count = source, index, count
        self.hooks, self.d = source.hooks, source.d
        self.shards_read: list[int] = []  # the shards this replica loaded, in order (tests, benchmarks)

    def __getattr__(self, name: str) -> Any:  # model_spec, batch_size, ... of the source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def identity(self) -> dict[str, Any]:
        return {**self.source.identity(), "dp_read": "disjoint", "replicas": self.count}

    def shards_of(self, epoch: int, replica: int | None = None) -> list[int]:
        """The shards ``replica`` (default: this one) reads in ``epoch``, in reading order."""
        order = torch.randperm(self.source.cache.n_shards, generator=_epoch_generator(self.source.seed, epoch)).tolist()
        return order[(self.index if replica is None else replica)::self.count]

    def local_batch(self, replica: int | None = None) -> int:
        lo, hi = split_bounds(self.source.batch_size, self.index if replica is None else replica, self.count)
        return hi - lo

    def max_steps(self) -> int | None:
        """Steps every replica can fill with full batches (None: the stream loops forever)."""
        if self.source.epochs is None:
            return None
        rows = self.source.cache.shard_rows
        return min(sum(rows(i) for e in range(self.source.epochs) for i in self.shards_of(e, r)) // self.local_batch(r)
                   for r in range(self.count))

    def _chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        src = self.source

        def load(i: int) -> dict[str, torch.Tensor]:
            self.shards_read.append(i)
            return src.cache.shard(i, src.hooks)

        epoch = 0
        while src.epochs is None or epoch < src.epochs:
            mine = self.shards_of(epoch)
            yield from (_prefetched(load, mine) if src.prefetch else map(load, mine))
            epoch += 1

    def iterate(self, skip_batches: int = 0) -> Iterator[ActivationBatch]:
        src, local = self.source, self.local_batch()
        gen = torch.Generator().manual_seed((src.seed * 1_000_003 + 7_919 * (self.index + 1)) % (2**63))
        buf = ShuffleBuffer(max(local, -(-src.shuffle_buffer // self.count)), gen, src.device)
        limit = self.max_steps()
        step = 0
        for rows in buf.shuffle_chunks(self._chunks(), local, gather=lambda: step >= skip_batches):
            if limit is not None and step >= limit:
                return
            step += 1
            if step <= skip_batches:
                continue
            b = src._to_batch(rows)
            b.global_rows = src.batch_size
            yield b
        if step == 0:
            raise SaeforgeError("ShardSplit has no rows to give; point it at a non-empty cache")

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.iterate()


@dataclass
class StreamConfig(JsonConfig):
    """Where a training run's activations come from: a cache folder from ``saeforge harvest``, or text
    (``.txt/.jsonl/.parquet``/HF data set) run through ``model`` as it goes (no cache)."""

    data: str  # a cache folder or a text source
    model: str | None = None  # needed with text data: HF hub id, local folder or llama2.c .bin
    tokenizer: str | None = None  # llama2.c tokenizer .bin (default: tok*.bin beside the model)
    context_len: int = 128  # tokens per context when streaming text
    text_field: str = "text"  # text field of .jsonl/.parquet/HF data
    shuffle_buffer: int = 262144  # rows held in the shuffle buffer; bounds memory (ranges: checked by the stream)


def open_stream(source: str | Path | StreamConfig, hooks: list[str] | None = None, batch_size: int = 4096,
                seed: int = 0, device: Any = None, **kw: Any) -> CachedStream | LiveStream:
    """Open an activation stream: a cache folder gives a :class:`CachedStream`; text with a model (a
    :class:`StreamConfig` naming one) a :class:`LiveStream`. Under ``torchrun`` the process group starts first
    (before the model lands on this rank's GPU). ``kw`` goes to the stream (e.g. ``epochs``)."""
    cfg = source if isinstance(source, StreamConfig) else StreamConfig(data=str(source))
    if isinstance(source, StreamConfig):
        kw.setdefault("shuffle_buffer", cfg.shuffle_buffer)
    dist.init(device)
    path = Path(cfg.data)
    if path.is_dir() and (path / MANIFEST).exists():
        return CachedStream(ActivationCache(path), batch_size=batch_size, hooks=hooks, seed=seed, **kw)
    if cfg.model is None:
        raise SaeforgeError(
            f"{cfg.data} is not an activation cache; pass --model to stream from text (or harvest a cache "
            "with `saeforge harvest`)"
        )

    model = load_model(cfg.model, tokenizer=cfg.tokenizer, device=resolve_device(device))
    return LiveStream(model, hooks, cfg.data, batch_size=batch_size, context_len=cfg.context_len, seed=seed,
                      text_field=cfg.text_field, **kw)
