"""Activation streams: shuffle buffer, cached and live streams, deterministic resume, memory bound."""
from __future__ import annotations

import weakref

import pytest
import torch

from saeforge.activations import CachedStream, LiveStream, ShuffleBuffer, open_stream
from saeforge.activations.cache import ActivationCache, HarvestConfig, harvest
from saeforge.errors import SaeforgeError

HOOKS = ["resid_post.1", "resid_post.3"]
N_ROWS = 1500
PACKING = dict(context_len=32, batch_contexts=8)


@pytest.fixture(scope="module")
def model(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, stories_model_path, tinystories_train):
    out = tmp_path_factory.mktemp("stream") / "acts"
    cfg = HarvestConfig(model=str(stories_model_path), data=str(tinystories_train), hooks=HOOKS, out=str(out),
                        shard_tokens=256, max_tokens=N_ROWS, **PACKING)
    return ActivationCache(harvest(cfg, progress=False))


def _all_rows(cache: ActivationCache) -> dict[str, torch.Tensor]:
    shards = [cache.shard(i) for i in range(cache.n_shards)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def _sorted(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical order by (doc, pos), which is unique per kept row."""
    key = rows["doc"].long() * 100_000 + rows["pos"].long()
    assert key.unique().numel() == key.numel()
    order = torch.argsort(key)
    return {k: v[order] for k, v in rows.items()}


def _cat(batches) -> dict[str, torch.Tensor]:
    out = {f"acts.{h}": torch.cat([b.acts[h] for b in batches]) for h in batches[0].acts}
    for k in ("token_id", "doc", "pos"):
        out[k] = torch.cat([getattr(b, k) for b in batches])
    return out


def _same_batches(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        all(torch.equal(x.acts[h], y.acts[h]) for h in x.acts)
        and torch.equal(x.doc, y.doc) and torch.equal(x.pos, y.pos)
        for x, y in zip(xs, ys)
    )


# ---------------------------------------------------------------------------------------------- ShuffleBuffer


def _shuffle(n_rows, chunk_sizes, capacity, batch, seed):
    buf = ShuffleBuffer(capacity, torch.Generator().manual_seed(seed))
    sizes, start, chunks = list(chunk_sizes), 0, []
    for s in sizes:
        chunks.append({"x": torch.arange(start, start + s), "y": torch.arange(start, start + s).float()[:, None] * 2})
        start += s
    assert start == n_rows
    peak = []
    real_push = buf.push

    def push(chunk):
        real_push(chunk)
        peak.append(buf.size)

    buf.push = push
    out = list(buf.shuffle_chunks(chunks, batch, gather=lambda: True))
    assert buf._store["x"].shape[0] == capacity and max(peak) <= capacity
    return out


def test_shuffle_buffer_is_a_deterministic_permutation():
    sizes = [37, 250, 5, 1, 90, 117]
    out = _shuffle(500, sizes, capacity=100, batch=16, seed=3)
    xs = torch.cat([o["x"] for o in out])
    assert torch.equal(torch.sort(xs).values, torch.arange(500))  # every row exactly once
    assert all(torch.equal(o["y"][:, 0], o["x"].float() * 2) for o in out)  # rows stay intact
    assert [len(o["x"]) for o in out] == [16] * 31 + [4]
    assert not torch.equal(xs, torch.arange(500))
    again = torch.cat([o["x"] for o in _shuffle(500, sizes, 100, 16, seed=3)])
    other = torch.cat([o["x"] for o in _shuffle(500, sizes, 100, 16, seed=4)])
    assert torch.equal(xs, again) and not torch.equal(xs, other)


def test_shuffle_buffer_pop_is_uniform():
    """Pop 3 of 10 resident values 3000 times; each value's pick count must pass a chi-square test."""
    buf = ShuffleBuffer(10, torch.Generator().manual_seed(0))
    buf.push({"v": torch.arange(10)})
    counts = torch.zeros(10)
    for _ in range(3000):
        got = buf.pop(3)["v"]
        counts += torch.bincount(got, minlength=10)
        assert len(buf) == 7
        buf.push({"v": got})
    expected = 3000 * 3 / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88  # 9 degrees of freedom, p = 0.001
    with pytest.raises(ValueError):
        buf.push({"v": torch.arange(1)})


# ---------------------------------------------------------------------------------------------- CachedStream


def test_cached_stream_gives_every_row_once_per_epoch(cache):
    ref = _sorted(_all_rows(cache))
    stream = CachedStream(cache, batch_size=128, shuffle_buffer=300, epochs=2, seed=1)
    batches = list(stream)
    per_epoch = stream.batches_per_epoch()
    assert per_epoch == -(-N_ROWS // 128) and len(batches) == 2 * per_epoch
    b = batches[0]
    assert b.acts[HOOKS[0]].dtype == torch.float32 and b.token_id.dtype == torch.int64 and len(b) == 128
    epochs = [_cat(batches[:per_epoch]), _cat(batches[per_epoch:])]
    for rows in epochs:
        got = _sorted(rows)
        assert torch.equal(got["token_id"], ref["token_id"].long()) and torch.equal(got["pos"], ref["pos"].long())
        for h in HOOKS:
            assert torch.equal(got[f"acts.{h}"], ref[f"acts.{h}"])  # bit-exact copies of the cache
    assert not torch.equal(epochs[0]["doc"], epochs[1]["doc"])  # each epoch has its own order
    assert not torch.equal(epochs[0]["doc"], ref["doc"])


def test_cached_stream_determinism_prefetch_and_hook_subset(cache):
    a = list(CachedStream(cache, batch_size=100, shuffle_buffer=256, epochs=1, seed=7, prefetch=True))
    b = list(CachedStream(cache, batch_size=100, shuffle_buffer=256, epochs=1, seed=7, prefetch=False))
    c = list(CachedStream(cache, batch_size=100, shuffle_buffer=256, epochs=1, seed=8))
    assert _same_batches(a, b) and not _same_batches(a, c)
    sub = list(CachedStream(cache, batch_size=100, shuffle_buffer=256, epochs=1, seed=7, hooks=[HOOKS[1]]))
    assert list(sub[0].acts) == [HOOKS[1]] and torch.equal(sub[3].acts[HOOKS[1]], a[3].acts[HOOKS[1]])
    with pytest.raises(SaeforgeError, match="not in cache"):
        CachedStream(cache, hooks=["resid_post.0"])


@pytest.mark.parametrize("skip", [5, 12, 30])  # inside epoch 0, at the epoch boundary, inside epoch 2
def test_skip_batches_replays_exactly(cache, skip):
    stream = CachedStream(cache, batch_size=125, shuffle_buffer=400, seed=2)  # endless; 12 batches per epoch
    it = stream.iterate()
    full = [next(it) for _ in range(skip + 4)]
    it2 = stream.iterate(skip_batches=skip)
    assert _same_batches(full[skip:], [next(it2) for _ in range(4)])


@pytest.mark.parametrize("prefetch,limit", [(False, 0), (True, 1)])
def test_memory_holds_at_most_one_shard_besides_the_buffer(cache, monkeypatch, prefetch, limit):
    """When a shard is loaded, at most ``limit`` other shards may still be alive (0, or 1 with prefetch)."""
    alive: list[weakref.ref] = []
    seen: list[int] = []
    real = ActivationCache.shard

    def shard(self, i, hooks=None):  # no gc.collect(): shards must be freed by reference counting alone
        seen.append(sum(r() is not None for r in alive))
        out = real(self, i, hooks)
        alive.append(weakref.ref(out["token_id"]))
        return out

    monkeypatch.setattr(ActivationCache, "shard", shard)
    for _ in CachedStream(cache, batch_size=64, shuffle_buffer=128, epochs=1, prefetch=prefetch):
        pass
    assert len(seen) == cache.n_shards >= 5 and max(seen) <= limit


# ---------------------------------------------------------------------------------------------- LiveStream


def test_live_stream_matches_cached_rows(cache, model, tinystories_train):
    live = LiveStream(model, HOOKS, str(tinystories_train), batch_size=128, shuffle_buffer=300, epochs=1,
                      max_tokens=N_ROWS, seed=5, **PACKING)
    assert live.d == cache.d
    batches = list(live)
    got, ref = _sorted(_cat(batches)), _sorted(_all_rows(cache))
    assert torch.equal(got["token_id"], ref["token_id"].long()) and torch.equal(got["doc"], ref["doc"])
    for h in HOOKS:
        assert torch.equal(got[f"acts.{h}"], ref[f"acts.{h}"])
    # replay inside a live epoch
    assert _same_batches(batches[9:], list(live.iterate(skip_batches=9)))


def test_open_stream(cache, tmp_path):
    s = open_stream(str(cache.path), batch_size=32, epochs=1)
    assert isinstance(s, CachedStream) and s.hooks == HOOKS and s.d == {h: 64 for h in HOOKS}
    with pytest.raises(SaeforgeError, match="not an activation cache"):
        open_stream(str(tmp_path))
