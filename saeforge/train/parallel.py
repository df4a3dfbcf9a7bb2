"""What the one training loop needs from the process group, as a few hooks.

:class:`Parallel` is built by the trainer from its config. With one process (no torchrun) every hook is
the identity or a plain local call, so the single-process loop computes exactly what it did before. Under
``torchrun`` it opens the process group (:mod:`saeforge.distributed`) and lays out a mesh of
``replicas × shards``:

* the stream is wrapped so that each replica gets a disjoint, deterministic slice of every global batch
  (:class:`saeforge.activations.stream.RankSlice`);
* with ``shards > 1`` each SAE is replaced by its latent-sharded form (:mod:`saeforge.sae.sharded`);
* after backward the gradients are averaged over the replicas, weighted by rows (one flat all-reduce);
  gradient clipping uses the norm of the whole (unsharded) SAE;
* ``fired`` masks are max-reduced over the world, so the dead-latent counters are global;
* metric lines are averaged over the replicas; only global rank 0 writes files;
* checkpoints always hold the full, unsharded state, so a run taken with N processes resumes with M.

``spread=True`` (sweeps) instead places whole SAEs on processes (:meth:`owners`): each process trains
its SAEs on the full batches, nothing is synchronised, and each SAE's files are written by its owner.
"""
from __future__ import annotations

from typing import Any

import torch

from saeforge import distributed as dist
from saeforge.activations.stream import CachedStream, LiveStream, RankSlice, ShardSplit
from saeforge.distributed import split_bounds  # noqa: F401  (re-exported)
from saeforge.errors import SaeforgeError
from saeforge.sae.base import SAE
from saeforge.sae.sharded import ShardedTopKSAE
from saeforge.train.optim import match_param_layout


class _Frozen:
    """A state dict with the ``state_dict()`` accessor that ``save_checkpoint`` expects."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def place(sizes: dict[str, int], n_procs: int) -> dict[str, int]:
    """Owner process of each SAE: largest first onto the least-loaded process (any counts, no divisibility)."""
    load = [0] * n_procs
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        p = min(range(n_procs), key=lambda i: (load[i], i))
        owner[name] = p
        load[p] += sizes[name]
    return owner


class Parallel:
    """The trainer's distributed policy (see the module docstring)."""

    def __init__(self, shards: int = 1, spread: bool = False, device: Any = None, dp_read: str = "exact"):
        dist.init(device)
        self.spread = spread and dist.world_size() > 1
        if self.spread and shards not in (0, 1):
            raise SaeforgeError("spreading SAEs over processes and --shard-latents do not combine; pick one")
        # spreading: every process trains its own SAEs on whole batches, so no rows or latents are split
        self.mesh = dist.Mesh() if self.spread else dist.Mesh.build(shards)
        dist.use_mesh(self.mesh)
        self.replicas, self.shards = self.mesh.replicas, self.mesh.shards
        self.world = dist.world_size()
        self.dp_read = dp_read

    @property
    def rank(self) -> int:
        return dist.rank()

    # ---- who does what --------------------------------------------------------------------------
    @property
    def writer(self) -> bool:
        """Whether this process writes shared artifacts (train_cfg.json, checkpoint, sweep index)."""
        return dist.is_main()

    def owners(self, sizes: dict[str, int]) -> dict[str, int]:
        """SAE name -> the process that trains it (every process for all SAEs unless spreading)."""
        if not self.spread:
            return {n: dist.rank() for n in sizes}
        return place(sizes, self.world)

    def stream(self, stream: Any) -> Any:
        if self.dp_read == "disjoint" and not isinstance(stream, CachedStream):
            raise SaeforgeError("--dp-read disjoint deals a cache's shards over the replicas; this stream is not a "
                                "cache (a live stream already splits its forward passes): use --dp-read exact")
        if self.world > 1 and isinstance(stream, LiveStream):  # a LiveStream: share the model's forward passes
            stream.split_forward(dist.Group(list(range(self.world))))
        if self.replicas == 1:
            return stream
        if self.dp_read == "disjoint":  # each replica reads its own shards (1/R of the I/O)
            return ShardSplit(stream, self.mesh.replica, self.replicas)
        return RankSlice(stream, self.mesh.replica, self.replicas)

    def sae(self, sae: SAE) -> SAE:
        if self.shards == 1:
            return sae
        return ShardedTopKSAE(sae, self.mesh.shard)

    @torch.no_grad()
    def after_init(self, sae: SAE) -> None:
        """After data-dependent init: make every process hold rank 0's weights, then take the local slice."""
        if self.spread or self.world == 1:
            return
        sharded = isinstance(sae, ShardedTopKSAE)
        full = sae.template if sharded and sae.template is not None else sae
        for t in list(full.parameters()) + list(full.buffers()):
            dist.broadcast(t.data)
        if sharded:
            sae.reslice()

    # ---- per step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_grads(self, sae: Any, n_local: int, n_global: int) -> None:
        """Row-weighted mean of the gradients over the replicas (one flat all-reduce)."""
        if self.replicas == 1:
            return
        params = [p for p in sae.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params]).mul_(n_local / n_global)
        dist.all_reduce(flat, group=self.mesh.data)
        off = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n

    def clip_grad_norm_(self, sae: Any, max_norm: float, scale: bool = True) -> torch.Tensor:
        """Clip to the norm of the whole SAE's gradient; returns that norm (as torch's clip does). With
        ``scale=False`` only the norm is computed (sign descent: one positive factor cannot change a sign)."""
        if self.shards == 1:
            if not scale:
                return torch.nn.utils.get_total_norm([p.grad for p in sae.parameters() if p.grad is not None])
            return torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
        sharded = sae.sharded_parameter_names()
        with torch.no_grad():
            sq = {True: [], False: []}
            for n, p in sae.named_parameters():
                if p.grad is not None:
                    sq[n in sharded].append(p.grad.float().pow(2).sum())
            zero = torch.zeros((), device=sae.W_dec.device)
            part = torch.stack(sq[True]).sum() if sq[True] else zero
            dist.all_reduce(part, group=self.mesh.shard)
            total = (part + (torch.stack(sq[False]).sum() if sq[False] else zero)).sqrt()
            if scale:
                coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
                for p in sae.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.dtype))
        return total

    @torch.no_grad()
    def after_resample(self, sae: Any, opt: torch.optim.Optimizer, since_fired: torch.Tensor) -> None:
        """Resampling read this replica's rows only: make every replica take global rank 0's result."""
        if self.replicas == 1:
            return
        for t in list(sae.parameters()) + [since_fired]:
            dist.broadcast(t.data, group=self.mesh.data)
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    dist.broadcast(v, group=self.mesh.data)

    def fired(self, fired: torch.Tensor) -> torch.Tensor:
        """Latents fired anywhere in the global batch (max over the world: shards and replicas)."""
        if self.world == 1 or self.spread:
            return fired
        f = fired.to(torch.uint8)
        return dist.all_reduce(f, op="max").bool()

    def mean_metrics(self, acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metric sums averaged over the replicas (each replica saw its share of the rows)."""
        if self.replicas == 1 or not acc:
            return acc
        keys = list(acc)  # the same order on every process
        flat = torch.stack([acc[k].float().reshape(()) for k in keys])
        dist.all_reduce(flat, group=self.mesh.data)
        flat /= self.replicas
        return {k: flat[i] for i, k in enumerate(keys)}

    # ---- state ------------------------------------------------------------------------------------
    def full_states(self, sae: Any, opt: torch.optim.Optimizer) -> tuple[_Frozen, _Frozen]:
        """The unsharded model and optimizer state (collective when sharded)."""
        if isinstance(sae, ShardedTopKSAE):
            return _Frozen(sae.full_state_dict()), _Frozen(sae.full_optimizer_state(opt.state_dict()))
        return _Frozen(sae.state_dict()), _Frozen(opt.state_dict())

    def load_states(self, sae: Any, opt: torch.optim.Optimizer, model: dict, opt_state: dict) -> None:
        if isinstance(sae, ShardedTopKSAE):
            sae.load_full_state_dict(model)
            opt.load_state_dict(sae.local_optimizer_state(opt_state))
        else:
            sae.load_state_dict(model)
            opt.load_state_dict(opt_state)
        match_param_layout(opt)

    def full_sae(self, sae: SAE) -> SAE:
        """The ordinary SAE to save and return (collective when sharded)."""
        return sae.gathered() if isinstance(sae, ShardedTopKSAE) else sae

    def comm_seconds(self) -> float | None:
        """Seconds this process has spent in collectives so far (None with one process: nothing to report)."""
        return dist.COMM_SECONDS if self.world > 1 else None

    def gather_object(self, obj: Any) -> list[Any]:
        return dist.all_gather_object(obj)

    def barrier(self) -> None:
        dist.barrier()
