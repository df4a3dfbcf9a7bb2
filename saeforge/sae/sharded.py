"""Latent sharding (tensor parallel over ``d_sae``) for TopK SAEs: ``saeforge train --shard-latents S``.

The ``S`` processes of one shard group each hold ``d_sae / S`` consecutive latents: columns
``[lo, hi)`` of ``W_enc``, the same entries of ``b_enc`` and rows of ``W_dec``; ``b_dec`` is replicated.
One training step, exact against the unsharded SAE (up to the summation order of floats):

1. every shard computes its pre-activations and its local top-k (the sparse kernels of
   :func:`saeforge.kernels.topk_autograd.topk_encode`): the global top-k of a row is among the union of
   the local top-k's, so
2. the shards exchange their ``[B, k]`` candidate values (all-gather, ``S·B·k`` values) and each takes the
   global top-k, keeping the entries that are its own;
3. each shard decodes its kept entries with its decoder rows; the partial reconstructions are summed
   (all-reduce of ``[B, d_out]``) and ``b_dec`` is added once;
4. the loss is then the same on every shard; the backward of the sum is the identity, and ``b_dec``'s
   encoder-side gradient (it is ``b_pre``) is summed over the shards.

AuxK runs the same exchange over the dead latents (local top-``k_aux`` candidates, global top-``k_aux``);
``fired`` is returned full-width (zeros outside this shard's latents), and the trainer's max-reduction over
the world both assembles the shards and ORs the replicas, so the dead-latent counters are the
single-process ones. The saved SAE is an ordinary :class:`~saeforge.sae.topk.TopKSAE` (:meth:`gathered`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from saeforge import distributed as dist
from saeforge.distributed.ops import sum_grad, sum_partials
from saeforge.errors import SaeforgeError
from saeforge.kernels.topk_autograd import sparse_decode, topk_encode
from saeforge.kernels.sparse_losses import fired_latents
from saeforge.sae.base import SAE, Codes, StepState, TrainStepInput, create_sae
from saeforge.sae.topk import TopKSAE

# parameter name -> the dimension it is split along (absent: replicated)
SHARD_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


def _global_select(vals: Tensor, k: int, group: dist.Group) -> tuple[Tensor, Tensor]:
    """``vals [B, w]`` (this shard's candidates, ReLU'd; padding −1) -> (mask of this shard's candidates in the
    global top-k ``[B, w]``, the global top-k values ``[B, k]``)."""
    allv = torch.cat(dist.all_gather(vals.detach(), group), 1)  # [B, S·w]
    k = min(k, allv.shape[1])
    top_v, top_i = allv.topk(k, dim=1, sorted=False)
    sel = torch.zeros_like(allv, dtype=torch.bool).scatter_(1, top_i, True)
    w = vals.shape[1]
    mine = sel[:, group.rank * w:(group.rank + 1) * w] & (vals.detach() >= 0)
    return mine, top_v


class ShardedTopKSAE(TopKSAE):
    """This process's slice of a TopK SAE's latents; same training interface as the SAE it came from."""

    def __init__(self, sae: SAE, group: dist.Group):
        if type(sae) is not TopKSAE:
            raise SaeforgeError(f"--shard-latents supports the topk architecture, not {sae.cfg.arch!r}")
        if sae.cfg.multi_topk:
            raise SaeforgeError("--shard-latents does not support multi_topk yet; train it unsharded")
        if sae.cfg.skip:
            raise SaeforgeError("--shard-latents does not support skip connections yet")
        S = group.size
        if sae.cfg.d_sae % S:
            raise SaeforgeError(f"--shard-latents {S} must divide the width {sae.cfg.d_sae}")
        nn.Module.__init__(self)
        self.cfg = sae.cfg
        self.group = group
        self.n_local = sae.cfg.d_sae // S
        self.lo = group.rank * self.n_local
        self.hi = self.lo + self.n_local
        self._norm_ctx = None
        self.template: SAE | None = sae  # the full SAE, kept until data-dependent init is done
        for name, p in sae.named_parameters():
            self.register_parameter(name, nn.Parameter(self._local(name, p.detach()).clone()))

    # ---- full <-> local ---------------------------------------------------------------------------
    def _local(self, name: str, full: Tensor) -> Tensor:
        dim = SHARD_DIMS.get(name)
        if dim is None or full.dim() == 0 or full.shape[dim] != self.cfg.d_sae:
            return full
        return full.narrow(dim, self.lo, self.n_local)

    def _full(self, name: str, local: Tensor) -> Tensor:
        dim = SHARD_DIMS.get(name)
        if dim is None or local.dim() == 0 or local.shape[dim] != self.n_local:
            return local
        return torch.cat(dist.all_gather(local.detach(), self.group), dim)

    @torch.no_grad()
    def reslice(self) -> None:
        """Copy this shard's slice of the (data-initialised) template into the parameters; drop the template."""
        if self.template is None:
            return
        for name, p in self.template.named_parameters():
            getattr(self, name).copy_(self._local(name, p.detach()))
        self.template = None

    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        if self.template is None:
            raise SaeforgeError("data-dependent init after the first step is not supported on a sharded SAE")
        self.template.to(x.device).init_from_data(x, y)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded state (collective: every shard must call it)."""
        return {n: self._full(n, p) for n, p in self.named_parameters()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(self._local(n, state[n].to(p.device)))
        self.template = None

    def local_optimizer_state(self, full: dict) -> dict:
        """Slice a full (unsharded) optimizer state dict to this shard's parameters."""
        names = [n for n, _ in self.named_parameters()]
        state = {pid: {k: (self._local(names[pid], v) if torch.is_tensor(v) else v) for k, v in st.items()}
                 for pid, st in full["state"].items()}
        return {"state": state, "param_groups": full["param_groups"]}

    def full_optimizer_state(self, local: dict) -> dict:
        names = [n for n, _ in self.named_parameters()]
        state = {pid: {k: (self._full(names[pid], v) if torch.is_tensor(v) else v) for k, v in st.items()}
                 for pid, st in sorted(local["state"].items())}
        return {"state": state, "param_groups": local["param_groups"]}

    def gathered(self) -> TopKSAE:
        """An ordinary TopK SAE with all the latents (collective)."""
        full = create_sae(self.cfg)
        full.load_state_dict(self.full_state_dict())
        return full.to(self.W_dec.device)

    def sharded_parameter_names(self) -> set[str]:
        return set(SHARD_DIMS)

    # ---- inference is for the gathered SAE -------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        raise SaeforgeError("a sharded SAE only trains; call gathered() for inference")

    # ---- one training step --------------------------------------------------------------------------
    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        """This shard's top-k candidates, kept where they are among the row's global top k (exact)."""
        cfg, g = self.cfg, self.group
        x2 = x.reshape(-1, x.shape[-1])
        dead_full = inp.dead_mask if (inp.dead_mask is not None and cfg.aux_coef > 0) else None
        dead = dead_full[self.lo:self.hi] if dead_full is not None else None
        b_pre = sum_grad(self.b_dec, g) if cfg.apply_b_dec_to_input else None
        sel = topk_encode(x2, self.W_enc, self.b_enc, min(cfg.k, self.n_local), b_pre=b_pre, dead_mask=dead,
                          k_aux=min(cfg.k_aux, cfg.d_sae, self.n_local))
        mine, top_v = _global_select(sel.vals, cfg.k, g)
        vals = sel.vals * mine
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x2.device)
        fired[self.lo:self.hi] = fired_latents(sel.idx, mine & (vals.detach() > 0), self.n_local)
        return Codes(vals=vals, idx=sel.idx, selection=sel, fired=fired, l0=(top_v > 0).sum(-1).float().mean())

    def training_decode(self, codes: Codes) -> Tensor:
        """The shards' partial sums, all-reduced, plus b_dec."""
        return sum_partials(sparse_decode(codes.vals, codes.idx, self.W_dec, None), self.group) + self.b_dec

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        """AuxK over the global top-k_aux of the dead latents of all shards."""
        cfg, g = self.cfg, self.group
        if s.inp.dead_mask is None or cfg.aux_coef <= 0:
            return {}
        k_aux = min(cfg.k_aux, cfg.d_sae)
        av, ai = s.codes.selection.aux_vals, s.codes.selection.aux_idx
        w = min(k_aux, self.n_local)
        if av.shape[1] < w:  # CPU: only this shard's dead latents were searched; pad to a common width
            pad = w - av.shape[1]
            av = torch.cat([av, av.new_full((av.shape[0], pad), -1.0)], 1)
            ai = torch.cat([ai, ai.new_zeros(ai.shape[0], pad)], 1)
        amine, _ = _global_select(av, k_aux, g)
        e_hat = sum_partials(sparse_decode(av.clamp_min(0) * amine, ai, self.W_dec, None), g)
        aux = (e_hat - s.e.detach()).pow(2).sum() / s.denom
        return {"aux": (cfg.aux_coef, torch.where(s.inp.dead_mask.any(), aux, torch.zeros_like(aux)))}
