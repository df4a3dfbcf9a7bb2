"""One rank of the distributed tests (tests/test_distributed.py starts them with saeforge.distributed.launch).

``python tests/dist_worker.py OUT SCENARIO [SCENARIO ...]``: every rank runs each scenario in order and
rank 0 writes what the test compares into ``OUT/<scenario>``. The same settings build the single-process
references in the test (``settings``, ``stream``, ``train_cfg``), so both sides train on the same global
batches.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

import os

D, B = 16, 128  # input width, GLOBAL batch size
DEVICE = os.environ.get("SAEFORGE_TEST_DEVICE", "cpu")  # tests/test_cuda.py runs the same scenarios on GPUs
STEPS = 20


def stream(n_batches=None):
    from saeforge.synthetic import SuperpositionStream

    return SuperpositionStream(d=D, n_features=48, p=0.06, batch_size=B, seed=3, n_batches=n_batches)


def train_cfg(steps=STEPS, **kw):
    from saeforge.train import TrainConfig

    # dead_tokens = one batch: latents that miss a batch are dead, so AuxK is live from the first steps
    base = dict(total_tokens=steps * B, batch_size=B, lr=3e-3, log_every=5, checkpoint_every=0, device=DEVICE,
                dtype="float32", dead_tokens=B, init_tokens=512, warmup_steps=2)
    return TrainConfig(**{**base, **kw})


def sae_cfg(arch):
    from saeforge.sae import make_config

    if arch == "topk":
        return make_config("topk", d_in=D, d_sae=128, k=3, k_aux=8)
    if arch == "jumprelu":
        return make_config("jumprelu", d_in=D, d_sae=128, init_fire_count=8.0)
    if arch in ("batchtopk", "matryoshka"):  # the threshold estimate starts at step 4 of 20
        return make_config(arch, d_in=D, d_sae=128, k=3, k_aux=8, threshold_start_step=4)
    raise ValueError(arch)


def _train(arch, out, **kw):
    from saeforge.train import Trainer

    steps = kw.pop("steps", STEPS)
    n_batches = kw.pop("n_batches", None)
    resume = kw.pop("resume", False)
    t = Trainer({"": sae_cfg(arch)}, stream(n_batches), train_cfg(steps, **kw), out)
    return t.fit(resume=resume, progress=False)[""]


# ---- scenarios ---------------------------------------------------------------------------------------------
def dp_topk(out):
    _train("topk", out)


def dp_jumprelu(out):
    _train("jumprelu", out)


def dp_batchtopk(out):
    _train("batchtopk", out)


def dp_matryoshka(out):
    _train("matryoshka", out)


def shard_topk(out):
    _train("topk", out, shard_latents=0)


SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "stories260K" / "stories260K.bin"
TEXT = SHARED / "data" / "tinystories" / "train.txt"


def live_stream():
    from saeforge.activations.stream import LiveStream

    return LiveStream(str(MODEL), ["resid_post.2"], str(TEXT), batch_size=B, context_len=32, batch_contexts=4,
                      shuffle_buffer=1024, max_tokens=3000, seed=1)


def train_live(out, **kw):
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    cfg = make_config("topk", d_in=64, d_sae=128, k=4, hook="resid_post.2")
    Trainer({"": cfg}, live_stream(), train_cfg(10, init_tokens=256, **kw), out).fit(progress=False)


def live_dp(out):
    """Data parallel from a LiveStream: the forward passes are split over the ranks."""
    train_live(out)


def shard2_dp(out):
    _train("topk", out, shard_latents=2)


def shard_forward(out):
    """One training forward/backward of a latent-sharded TopK SAE from known weights, gathered."""
    from saeforge import distributed as dist
    from saeforge.sae import create_sae
    from saeforge.sae.base import TrainStepInput
    from saeforge.sae.sharded import ShardedTopKSAE

    torch.manual_seed(0)
    full = create_sae(sae_cfg("topk"))
    with torch.no_grad():
        full.b_enc.normal_(0, 0.1)
        full.b_dec.normal_(0, 0.1)
    x = stream().sample(B, torch.Generator().manual_seed(7))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    dist.use_mesh(dist.Mesh.build(0))
    sh = ShardedTopKSAE(full, dist.shard_group())
    sh.reslice()
    o = sh.training_forward(TrainStepInput(x, x, 0, 10, dead))
    o.loss.backward()
    # the dense codes of the selected latents, gathered over the shards
    n = sh.n_local
    B_, d = x.shape
    with torch.no_grad():
        from saeforge.kernels.topk_autograd import topk_encode

        c = topk_encode(x - sh.b_dec, sh.W_enc, sh.b_enc, 3)
        from saeforge.sae.sharded import _global_select

        mine, _ = _global_select(c.vals, 3, dist.shard_group())
        codes = torch.zeros(B_, n).scatter_(1, c.idx, c.vals * mine)
        codes = torch.cat(dist.all_gather(codes, dist.shard_group()), 1)
    grads = {nm: sh._full(nm, p.grad) for nm, p in sh.named_parameters()}
    fired = dist.all_reduce(o.fired.to(torch.uint8), op="max")
    if dist.rank() == 0:
        torch.save({"loss": o.loss.detach(), "losses": {k: v.detach() for k, v in o.losses.items()},
                    "y_hat": o.y_hat.detach(), "codes": codes, "grads": grads, "fired": fired.bool(),
                    "l0": o.l0, "x": x, "dead": dead, "state": full.state_dict()}, Path(out) / "forward.pt")
    dist.use_mesh(None)


def resume_cut(out):
    """A 2-rank run whose data ends after 10 of 20 steps, just after its step-10 checkpoint."""
    from saeforge.errors import SaeforgeError

    try:
        _train("topk", out, n_batches=STEPS // 2, checkpoint_every=STEPS // 2)
    except SaeforgeError as err:
        assert "ran out" in str(err)


def resume_from_one(out):
    """Continue (on this many ranks) a checkpoint a single process wrote into OUT/../one_cut."""
    src = Path(out).parent.parent / "one_cut" / "checkpoint.safetensors"
    from saeforge import distributed as dist

    if dist.rank() == 0:
        shutil.copy(src, Path(out) / "checkpoint.safetensors")
    dist.barrier()
    _train("topk", out, checkpoint_every=STEPS // 2, resume=True)


def spread(out):
    """A sweep of three SAEs placed over the ranks (two on one rank, one on the other)."""
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    grid = {f"topk_k{k}": make_config("topk", d_in=D, d_sae=32 * (1 + (k == 2)), k=k) for k in (2, 3, 4)}
    Trainer(grid, stream(), train_cfg(10, spread=True), out).fit(progress=False)


# ---- --dp-read disjoint: each replica reads its own shards of a harvested cache (SAEFORGE_TEST_CACHE) -------------
DB = 64  # global batch of the cache runs


def cache_stream(epochs=None):
    from saeforge.activations.stream import CachedStream

    return CachedStream(os.environ["SAEFORGE_TEST_CACHE"], batch_size=DB, shuffle_buffer=512, epochs=epochs, seed=1)


class _Cut:
    """A stream that stops after ``n`` batches (a run interrupted just after its step-``n`` checkpoint)."""

    def __init__(self, source, n):
        self.source, self.n = source, n

    def iterate(self, skip=0):
        import itertools

        return itertools.islice(self.source.iterate(skip), max(0, self.n - skip))


def train_cache(out, steps=12, cut=None, resume=False, **kw):
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    cfg = train_cfg(steps, batch_size=DB, total_tokens=steps * DB, init_tokens=256, dp_read="disjoint", **kw)
    t = Trainer({"": make_config("topk", d_in=64, d_sae=128, k=4)}, cache_stream(), cfg, out)
    if cut is not None:
        t.stream = _Cut(t.stream, cut)
    return t.fit(resume=resume, progress=False)


def disjoint_reads(out):
    """One epoch through ShardSplit on every rank: which shards each read, the rows it yielded, bytes read."""
    import json

    from saeforge import distributed as dist
    from saeforge.activations.stream import ShardSplit

    split = ShardSplit(cache_stream(epochs=1), dist.rank(), dist.world_size())
    rows, steps = [], 0
    for b in split.iterate():
        assert b.global_rows == DB and len(b) == split.local_batch()
        rows += list(zip(b.doc.tolist(), b.pos.tolist()))
        steps += 1
    cache = split.cache
    mine = {"shards": split.shards_read, "rows": rows, "steps": steps, "max_steps": split.max_steps(),
            "bytes": sum((cache.path / cache.manifest["shards"][i]["file"]).stat().st_size for i in split.shards_read)}
    parts = dist.all_gather_object(mine)
    if dist.rank() == 0:
        (Path(out) / "reads.json").write_text(json.dumps(parts))


def disjoint_train(out):
    train_cache(out)


def disjoint_cut(out):
    from saeforge.errors import SaeforgeError

    try:
        train_cache(out, cut=6, checkpoint_every=6)
    except SaeforgeError as err:
        assert "ran out" in str(err)


def disjoint_resume(out):
    """Continue the checkpoint disjoint_cut wrote at step 6 (same number of replicas)."""
    from saeforge import distributed as dist

    if dist.rank() == 0:
        shutil.copy(Path(out).parent / "disjoint_cut" / "checkpoint.safetensors", Path(out) / "checkpoint.safetensors")
    dist.barrier()
    train_cache(out, checkpoint_every=6, resume=True)


def main(argv: list[str]) -> int:
    from saeforge import distributed as dist

    root = Path(argv[0])
    dist.init(DEVICE)
    for name in argv[1:]:
        out = root / f"w{dist.world_size()}" / name
        out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        globals()[name](out)
        dist.barrier()
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
