"""Splice several frozen SAEs into a model at once: their reconstructions replace the activations.

Positions where ``keep`` is False (BOS, padding, special tokens) keep the original activation by default,
the same convention as ``saeforge eval`` (an SAE was never trained on those rows).
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.hooks import HookPoint, resolve_hook, splice
from saeforge.sae.base import SAE


class SpliceState:
    """Holds the current batch's keep-mask so the splice functions can see it."""

    def __init__(self) -> None:
        self.keep: Tensor | None = None


def _sae_hook(sae: SAE) -> str:
    hook = sae.cfg.target_hook or sae.cfg.hook
    if sae.cfg.is_transcoder:
        raise SaeforgeError("adapting around a transcoder is not supported yet; splice SAEs (input = target)")
    if not hook:
        raise SaeforgeError("the SAE's cfg.hook is empty; set it (e.g. resid_post.2) before splicing it")
    return hook


def resolve_sae_hooks(model: nn.Module, saes: Sequence[SAE], family: str | None) -> list[HookPoint]:
    return [resolve_hook(model, _sae_hook(s), family) for s in saes]


@contextlib.contextmanager
def spliced(model: nn.Module, saes: Sequence[SAE], hooks: Sequence[HookPoint], state: SpliceState,
            replace_special: bool = False) -> Iterator[None]:
    """While active, each hook's activation is replaced by its SAE's reconstruction ``sae(act)``."""

    def make_fn(sae: SAE):
        def fn(act: Tensor) -> Tensor:
            # with a device_map the hooked layer may sit on another GPU than the SAE: move there and back
            rec = sae(act.to(next(sae.parameters()).device).float()).to(act.device, act.dtype)
            if state.keep is None or replace_special:
                return rec
            return torch.where(state.keep[..., None].to(act.device), rec, act)

        return fn

    with contextlib.ExitStack() as stack:
        for sae, hp in zip(saes, hooks):
            stack.enter_context(splice(model, hp, make_fn(sae)))
        yield


def layer_index(module_path: str) -> int | None:
    """The block index in a dotted module path (``model.layers.2.mlp`` -> 2), or None."""
    m = re.search(r"\.(\d+)(?:\.|$)", module_path)
    return int(m.group(1)) if m else None
