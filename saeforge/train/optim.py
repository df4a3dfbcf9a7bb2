"""The optimizers the trainer can build (``TrainConfig.optimizer``).

* ``adam``: torch's Adam (fused where supported), with the trainer's warm-up and linear decay.
* ``signum``: sign descent made schedule-free (Defazio et al. 2024, "The Road Less Scheduled",
  arXiv:2405.15682), as sparsify trains its SAEs (``ScheduleFreeWrapper(SignSGD(...), momentum=0.95)``).
  Written out here as one ``torch.optim.Optimizer`` so that its state checkpoints, resamples and shards
  like Adam's; ``tests/test_optim.py`` checks it step for step against the ``schedulefree`` package.

Schedule-free sign descent keeps two points per weight: ``z``, moved by ``lr · sign(grad)`` each step, and
``x``, the running average of the ``z`` iterates (iterate k weighs (k+1)^r · lr², the paper's polynomial
weighting: a warm-up's small steps count less and, with ``power`` r > 0, recent iterates more).
Gradients are taken at ``y = β·x + (1−β)·z``, which is the parameter's value between steps. ``step()`` leaves
each ``.grad`` holding its sign (the gradients are spent by then; the trainer clears them next).

The SAE is saved at ``y``, the point whose loss the training log reports, not at the average ``x`` that
``schedulefree``'s ``eval()`` switches to. On short SAE runs ``y`` is much the better of the two (stories260K,
3M tokens: held-out FVU 0.031 at ``y`` against 0.044 at ``x``; docs/recipes/README.md), because ``x``
still carries the early iterates and the decoder-norm constraint acts on ``y``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

OPTIMIZERS = ("adam", "signum")


class ScheduleFreeSign(torch.optim.Optimizer):
    """Schedule-free sign descent; ``momentum`` is the interpolation β of ``y = β·x + (1−β)·z``, ``power`` the
    weighting exponent r of the average (``schedulefree``'s ``r``; 0 there by default)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.95, power: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        if not power >= 0:
            raise ValueError(f"power must be >= 0, got {power}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "power": power, "k": 0, "lr_max": 0.0,
                                  "weight_sum": 0.0})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = max(lr, group["lr_max"])
            weight = (group["k"] + 1) ** group["power"] * group["lr_max"] ** 2
            group["weight_sum"] += weight
            c = weight / group["weight_sum"]  # > 0: lr > 0 from the first step
            # With x = (y − (1−β)z)/β, z' = z − lr·s, x' = (1−c)x + c·z' and y' = βx' + (1−β)z', the new y is
            # y' = lerp(y, z, c) − (1 − β(1−c))·lr·s: three multi-tensor passes instead of five per-tensor ones.
            by_kind: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                ys, zs, gs = by_kind.setdefault((p.device, p.dtype), ([], [], []))
                ys.append(p)
                zs.append(state["z"])
                gs.append(p.grad)
            for ys, zs, gs in by_kind.values():
                torch._foreach_sign_(gs)  # in place: the gradients are spent (no 2 × |params| buffer per step)
                torch._foreach_lerp_(ys, zs, c)
                torch._foreach_add_(ys, gs, alpha=-(1 - beta * (1 - c)) * lr)
                torch._foreach_add_(zs, gs, alpha=-lr)
            group["k"] += 1
        return loss


@torch.no_grad()
def match_param_layout(opt: torch.optim.Optimizer) -> None:
    """Give every per-weight state tensor its parameter's memory layout (after ``load_state_dict``).

    Loaded state is contiguous (safetensors), while a weight may be stored transposed (``W_enc`` is
    latent-major, :func:`saeforge.sae.base.latent_major`); mixing layouts keeps the values but makes every
    elementwise optimizer pass strided (d = 768, m = 16,384, measured in isolation: 3–4× slower). Values are
    unchanged, so a resumed run stays byte-identical.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=v.dtype).copy_(v)
