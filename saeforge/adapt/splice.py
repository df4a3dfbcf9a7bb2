"""Splice several frozen SAEs into a model at once: their reconstructions replace the activations.

Each SAE is a :class:`~saeforge.eval.downstream.SpliceTarget`: it reads its input hooks and its reconstruction
replaces every hook it writes (``SAE.input_hooks`` / ``SAE.output_hooks``). A plain SAE reads and writes one
hook; a transcoder reads its input hook and, later in the same forward, replaces its target hook with its
output; a crosscoder writes several hooks, and its reconstruction at the first needs the activations at the
later ones, which a forward has not reached yet, so :func:`spliced_logits` first runs the model without the
splices to read them (with gradients, so a LoRA upstream trains through them) and then replaces every hook
the crosscoder writes in the spliced forward; the same definition as ``saeforge eval``'s splice, where the
unspliced forward is the clean one.

Positions where ``keep`` is False (BOS, padding, special tokens) keep the original activation by default,
the same convention as ``saeforge eval`` (an SAE was never trained on those rows).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.eval.downstream import SpliceTarget
from saeforge.hooks import HookPoint, recording, resolve_hook, splice
from saeforge.sae.base import SAE

# called with one SAE's input x and its targets (the activations its reconstruction replaced), per forward
OnRows = Callable[[Tensor, list[Tensor]], None]


class SpliceState:
    """The current batch's keep-mask, and the inputs of the SAEs that read them before the spliced forward."""

    def __init__(self) -> None:
        self.keep: Tensor | None = None
        self.inputs: dict[int, dict[str, Tensor]] = {}  # SAE index -> {hook point name: activation}


def resolve_sae_hooks(model: nn.Module, saes: Sequence[SAE], family: str | None) -> list[SpliceTarget]:
    targets = []
    for sae in saes:
        ins, outs = sae.input_hooks(), sae.output_hooks()
        if not ins or not outs:
            raise SaeforgeError("the SAE's cfg.hook is empty; set it (e.g. resid_post.2) before splicing it")
        points = {h: resolve_hook(model, h, family) for h in dict.fromkeys(ins + outs)}
        targets.append(SpliceTarget(sae, [points[h] for h in ins], [points[h] for h in outs]))
    return targets


def reads_ahead(target: SpliceTarget) -> bool:
    """Whether the SAE's inputs must be read before the spliced forward: it writes several hooks, and its
    reconstruction at the first of them depends on activations the forward has not reached yet."""
    return len(target.outputs) > 1


def _splice_one(model: nn.Module, i: int, t: SpliceTarget, state: SpliceState, replace_special: bool,
                on_rows: OnRows | None) -> contextlib.ExitStack:
    given = state.inputs.get(i)
    seen: dict[str, Tensor] = {}
    outs: dict[str, int] = {hp.name: j for j, hp in enumerate(t.outputs)}
    cur: dict[str, list[Tensor]] = {}

    def make_fn(hp: HookPoint):
        def fn(act: Tensor) -> Tensor:
            if given is None and any(p.name == hp.name for p in t.inputs):
                seen[hp.name] = act
            if hp.name not in outs:
                return act
            if "rec" not in cur:
                src = given if given is not None else seen
                missing = [p.name for p in t.inputs if p.name not in src]
                if missing:
                    raise SaeforgeError(f"the SAE writing {hp.name!r} reads {missing}, which the forward has not "
                                        "reached yet; splice it with spliced_logits (it reads its inputs first)")
                # with a device_map the hooked layers may sit on other GPUs than the SAE: move there and back
                dev = next(t.sae.parameters()).device
                x = t.sae.stack_inputs({h: src[p.name].to(dev) for h, p in zip(t.sae.input_hooks(), t.inputs)})
                cur["rec"] = t.sae.split_outputs(t.sae(x.float()))
                cur["x"], cur["y"] = [x], []
            cur["y"].append(act)
            rec = cur["rec"][outs[hp.name]].to(act.device, act.dtype)
            if len(cur["y"]) == len(outs):  # every output hook of this forward is done
                if on_rows is not None:
                    on_rows(cur["x"][0], cur["y"])
                cur.clear()
                seen.clear()
            if state.keep is None or replace_special:
                return rec
            return torch.where(state.keep[..., None].to(act.device), rec, act)

        return fn

    stack = contextlib.ExitStack()
    for hp in dict.fromkeys(t.inputs + t.outputs):
        stack.enter_context(splice(model, hp, make_fn(hp)))
    return stack


@contextlib.contextmanager
def spliced(model: nn.Module, saes: Sequence[SAE], hooks: Sequence[SpliceTarget], state: SpliceState,
            replace_special: bool = False, on_rows: Sequence[OnRows | None] | None = None) -> Iterator[None]:
    """While active, each SAE's reconstruction replaces the activations at its output hooks. An SAE that
    :func:`reads_ahead` takes its inputs from ``state.inputs`` (:func:`spliced_logits` fills them)."""
    with contextlib.ExitStack() as stack:
        for i, t in enumerate(hooks):
            stack.enter_context(_splice_one(model, i, t, state, replace_special, on_rows[i] if on_rows else None))
        yield


def spliced_logits(model: nn.Module, tokens: Tensor, saes: Sequence[SAE], hooks: Sequence[SpliceTarget],
                   state: SpliceState, replace_special: bool = False,
                   on_rows: Sequence[OnRows | None] | None = None) -> Tensor:
    """The logits of ``tokens`` with every SAE spliced: a first forward without the splices reads the inputs
    of the SAEs that :func:`reads_ahead`, then one spliced forward."""
    ahead = [i for i, t in enumerate(hooks) if reads_ahead(t)]
    state.inputs = {}
    if ahead:
        with recording(model, [hp for i in ahead for hp in hooks[i].inputs]) as acts:
            model(input_ids=tokens)
        state.inputs = {i: {hp.name: acts[hp.name] for hp in hooks[i].inputs} for i in ahead}
    try:
        with spliced(model, saes, hooks, state, replace_special, on_rows):
            return model(input_ids=tokens).logits
    finally:
        state.inputs = {}


def layer_index(module_path: str) -> int | None:
    """The block index in a dotted module path (``model.layers.2.mlp`` -> 2), or None."""
    m = re.search(r"\.(\d+)(?:\.|$)", module_path)
    return int(m.group(1)) if m else None
