"""The one place saeforge talks to ``torch.distributed``.

Everything above this package (stream, SAE wrappers, trainer, harvest, eval) calls these helpers and never
``torch.distributed`` itself. Without a process group every helper is a no-op on the calling process
(``all_reduce`` returns its input, ``all_gather`` a one-element list, ``rank()`` 0, ``world_size()`` 1), so
single-process code paths are exactly what they were.

Launch: ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (or a
rendezvous); :func:`init` reads them and opens the default group with NCCL when the work runs on CUDA and
gloo otherwise. A :class:`Mesh` splits the world into a 2-D grid of *replicas* (data parallel: disjoint
rows) × *shards* (latent parallel: disjoint latents); see docs/distributed.md.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import torch.distributed as _td
except ImportError:  # pragma: no cover - builds without distributed support
    _td = None  # type: ignore[assignment]

from saeforge.errors import SaeforgeError

__all__ = [
    "Group", "Mesh", "init", "launched", "active", "rank", "world_size", "local_rank", "is_main", "barrier",
    "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object", "backend",
    "destroy", "split_bounds", "current_mesh", "use_mesh", "data_group", "shard_group",
]


def launched() -> bool:
    """True when this process was started by torchrun (or anything setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one process is open."""
    return _td is not None and _td.is_available() and _td.is_initialized() and _td.get_world_size() > 1


def init(device: str | torch.device | None = None, timeout_s: float = 600.0) -> bool:
    """Open the default process group from torchrun's environment; return whether one is open.

    Idempotent. Backend: NCCL when ``device`` is CUDA (each process takes GPU ``LOCAL_RANK``), else gloo.
    Not launched by torchrun: nothing happens and False is returned.
    """
    if _td is None or not _td.is_available():
        if launched():
            raise SaeforgeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        return False
    if _td.is_initialized():
        return True
    if not launched():
        return False
    dev = torch.device(device) if device not in (None, "auto") else None
    use_cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank())
    _td.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def backend() -> str | None:
    return _td.get_backend() if active() else None


def destroy() -> None:
    global _MESH
    _MESH = None
    if _td is not None and _td.is_available() and _td.is_initialized():
        _td.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def split_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Items ``[lo, hi)`` of part ``index`` of ``count`` of ``n`` items (the first ``n % count`` parts get one more)."""
    base, extra = divmod(n, count)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


# ---- groups -----------------------------------------------------------------------------------------
@dataclass
class Group:
    """A set of global ranks that talk together (the world, one replica's shards, one shard's replicas)."""

    ranks: list[int]
    pg: Any = None  # the torch ProcessGroup; None for the world (the default group) or a group of one

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's position in the group."""
        return self.ranks.index(rank()) if self.size > 1 else 0

    def _pg(self) -> Any:
        return self.pg  # None is the default (world) group


def _world() -> Group:
    return Group(list(range(world_size())))


def _resolve(group: Group | None) -> Group:
    return group if group is not None else _world()


def rank(group: Group | None = None) -> int:
    """This process's rank in ``group`` (the world when None); 0 without a process group."""
    if not active():
        return 0
    return _td.get_rank() if group is None else group.rank


def world_size(group: Group | None = None) -> int:
    if not active():
        return 1
    return _td.get_world_size() if group is None else group.size


def is_main() -> bool:
    """True on the process that writes artifacts and logs (global rank 0, or the only process)."""
    return rank() == 0


def barrier(group: Group | None = None) -> None:
    g = _resolve(group)
    if active() and g.size > 1:
        _td.barrier(group=g._pg())


# ---- collectives --------------------------------------------------------------------------------------
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "prod": "PRODUCT"}

# Wall-clock seconds spent inside collectives by this process (gloo collectives are synchronous, so on CPU
# this is the communication time including waiting for peers; CUDA collectives are asynchronous and are
# not timed). The trainer reports it per metrics line as ``comm_s``.
COMM_SECONDS = 0.0


def _timed(fn: Any, *args: Any, **kw: Any) -> Any:
    global COMM_SECONDS
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    COMM_SECONDS += time.perf_counter() - t0
    return out


def all_reduce(t: torch.Tensor, op: str = "sum", group: Group | None = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group`` (``op``: sum, max, min, prod); returns ``t``."""
    g = _resolve(group)
    if active() and g.size > 1:
        _timed(_td.all_reduce, t, op=getattr(_td.ReduceOp, _OPS[op]), group=g._pg())
    return t


def all_gather(t: torch.Tensor, group: Group | None = None) -> list[torch.Tensor]:
    """The tensors ``t`` of every process of ``group``, in group order (same shape on every process)."""
    g = _resolve(group)
    if not (active() and g.size > 1):
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(g.size)]
    _timed(_td.all_gather, out, t, group=g._pg())
    return out


def all_gather_object(obj: Any, group: Group | None = None) -> list[Any]:
    """Picklable objects of every process of ``group``, in group order."""
    g = _resolve(group)
    if not (active() and g.size > 1):
        return [obj]
    out: list[Any] = [None] * g.size
    _timed(_td.all_gather_object, out, obj, group=g._pg())
    return out


def broadcast(t: torch.Tensor, src: int = 0, group: Group | None = None) -> torch.Tensor:
    """In place: every process of ``group`` gets the ``t`` of the group's process ``src``; returns ``t``."""
    g = _resolve(group)
    if active() and g.size > 1:
        _timed(_td.broadcast, t, src=g.ranks[src], group=g._pg())
    return t


def broadcast_object(obj: Any, src: int = 0, group: Group | None = None) -> Any:
    g = _resolve(group)
    if not (active() and g.size > 1):
        return obj
    box = [obj]
    _td.broadcast_object_list(box, src=g.ranks[src], group=g._pg())
    return box[0]


# ---- the 2-D mesh: replicas x shards ------------------------------------------------------------------
@dataclass
class Mesh:
    """The world as ``replicas × shards``: global rank ``r = replica · shards + shard``.

    ``data`` is this process's data-parallel group (the processes holding the same latents, one per
    replica; they split the rows of each batch), ``shard`` its latent-parallel group (the processes of
    one replica; they split the latents and see the same rows). Shards of one replica are consecutive
    ranks, so with ``--nproc_per_node`` a multiple of ``shards`` the heavy latent traffic stays in a node.
    """

    replicas: int = 1
    shards: int = 1
    data: Group = field(default_factory=lambda: Group([0]))
    shard: Group = field(default_factory=lambda: Group([0]))

    @classmethod
    def build(cls, shards: int = 1) -> "Mesh":
        """Every process must call this (it creates process groups), with the same ``shards``."""
        W = world_size()
        if W == 1:  # one process: nothing to split (--shard-latents is ignored without torchrun)
            return cls()
        shards = W if shards == 0 else shards
        if shards < 1 or W % shards:
            raise SaeforgeError(f"--shard-latents {shards} does not divide the {W} processes; use a divisor of {W}")
        replicas = W // shards
        me = rank()
        data = shard = None
        # new_group must be called by every process for every group, in the same order
        for s in range(shards):
            ranks = [r * shards + s for r in range(replicas)]
            pg = _td.new_group(ranks) if replicas not in (1, W) else None
            if me in ranks:
                data = Group(ranks, pg)
        for r in range(replicas):
            ranks = [r * shards + s for s in range(shards)]
            pg = _td.new_group(ranks) if shards not in (1, W) else None
            if me in ranks:
                shard = Group(ranks, pg)
        assert data is not None and shard is not None
        return cls(replicas, shards, data, shard)

    @property
    def replica(self) -> int:
        return self.data.rank

    @property
    def shard_index(self) -> int:
        return self.shard.rank


_MESH: Mesh | None = None


def current_mesh() -> Mesh:
    """The mesh the running training uses (a 1×1 mesh outside of one)."""
    return _MESH if _MESH is not None else Mesh()


def use_mesh(mesh: Mesh | None) -> None:
    """Make ``mesh`` the current one (the trainer does this); None resets to 1×1."""
    global _MESH
    _MESH = mesh


def data_group() -> Group:
    return current_mesh().data


def shard_group() -> Group:
    return current_mesh().shard
