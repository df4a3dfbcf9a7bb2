"""Named hook points: read (``capture``) or replace (``splice``) one activation inside a ``transformers`` model.

A hook point is a module plus which side of it we look at:

* ``model.layers.2.mlp``       -- the module's output (first element if it returns a tuple)
* ``model.layers.2.mlp:in``    -- the module's first input (positional, or the ``hidden_states`` keyword)
* ``resid_post.2`` etc.        -- family aliases resolved to the above (saeforge/models/families.py;
                                   docs/models.md)

``capture`` aborts the forward pass as soon as the last requested activation exists (``stop_early``): harvesting
layer 1 of a 24-layer model then costs ~2 layers, not 24 plus the LM head. Decoder layers return a tuple in
transformers 4.x and a bare tensor in 5.x; both are handled.
"""
from __future__ import annotations

import difflib
import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.hooknames import to_saeforge
from saeforge.models.families import FAMILIES, base_prefix, family_of


@dataclass(frozen=True)
class HookPoint:
    name: str  # canonical user-facing key, e.g. "resid_post.2" or "model.layers.2.mlp:in"
    module: str  # dotted module path inside the model
    io: str  # "output" | "input"
    # resid_mid: the norm's input is only a copy of the residual stream, which the block adds the MLP output to;
    # a splice there also adds (new - old) to this block's output, as replacing TransformerLens hook_resid_mid does
    residual_block: str | None = None


_ALIAS = re.compile(r"^(resid_pre|resid_mid|resid_post|attn_out|mlp_out|mlp_in)\.(-?\d+)$")
ALIASES = ("resid_pre.L", "resid_mid.L", "resid_post.L", "attn_out.L", "mlp_out.L", "mlp_in.L", "embed")


class _StopForward(Exception):
    """Raised from a hook to abort the rest of the forward pass once every activation is captured."""


def _unwrap(model: Any) -> tuple[nn.Module, str | None]:
    """Accept a LoadedModel too (duck-typed to avoid an import cycle)."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        return model.model, getattr(model, "family", None)
    return model, None


def _split_io(name: str) -> tuple[str, str]:
    for suffix, io in ((":input", "input"), (":in", "input"), (":output", "output"), (":out", "output")):
        if name.endswith(suffix):
            return name[: -len(suffix)], io
    if ":" in name:
        raise SaeforgeError(f"bad hook suffix in {name!r}; use MODULE, MODULE:in or an alias like resid_post.3")
    return name, "output"


def _module_point(modules: dict[str, nn.Module], path: str, io: str, name: str | None = None) -> HookPoint:
    if not path or path not in modules:
        close = difflib.get_close_matches(path, [n for n in modules if n], n=4, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"aliases: {', '.join(ALIASES)}"
        raise SaeforgeError(f"no module {path!r} in the model ({hint}); pass a dotted module name or an alias")
    canonical = path + (":in" if io == "input" else "")
    return HookPoint(name=name or canonical, module=path, io=io)


def resolve_hook(model: nn.Module, name: str, family: str | None = None) -> HookPoint:
    """Turn a user string into a :class:`HookPoint` (module paths are checked against the model).

    TransformerLens names (``blocks.2.hook_resid_post``, ``hook_embed``: the table in saeforge/hooknames.py)
    resolve as their saeforge alias; the point keeps the name it was asked for."""
    asked = name.strip()
    alias = to_saeforge(asked)
    point = _resolve(model, alias, family)
    return point if alias == asked else replace(point, name=asked)


def _resolve(model: nn.Module, name: str, family: str | None) -> HookPoint:
    model, fam = _unwrap(model)
    family = family or fam or family_of(model)
    name = name.strip()
    modules = dict(model.named_modules())
    m = _ALIAS.match(name)
    if not m and name != "embed":
        path, io = _split_io(name)
        return _module_point(modules, path, io)

    layout = FAMILIES.get(family or "")
    if layout is None:
        raise SaeforgeError(
            f"no hook aliases for model family {family!r}; use a module path such as "
            f"{_example_block(modules)} (known families: {', '.join(sorted(set(FAMILIES)))})"
        )
    base = base_prefix(modules, layout)  # "" or e.g. "model."
    if base is None:
        raise SaeforgeError(f"cannot find the {family} block list '{layout.blocks}' in this model; use a module path instead of {name!r}")
    blocks = base + layout.blocks
    if name == "embed":
        return _module_point(modules, base + layout.embed, "output", name="embed")
    kind, layer = m.group(1), int(m.group(2))
    n_layers = len(modules[blocks])
    if not 0 <= layer < n_layers:
        raise SaeforgeError(f"layer {layer} in {name!r} is out of range: the model has n_layers={n_layers} (0..{n_layers - 1})")
    block = f"{blocks}.{layer}"
    if kind == "resid_pre":
        return _module_point(modules, block, "input", name=name)
    if kind == "resid_post":
        return _module_point(modules, block, "output", name=name)
    if kind == "resid_mid" and layout.resid_mid is None:
        raise SaeforgeError(f"{name!r}: {family} blocks have no residual stream between attention and MLP "
                            f"(parallel or post-LN sublayers); use resid_pre.{layer} or resid_post.{layer}")
    sub, io = _split_io(getattr(layout, kind))
    point = _module_point(modules, f"{block}.{sub}", io, name=name)
    return replace(point, residual_block=block) if kind == "resid_mid" else point


def _example_block(modules: dict[str, nn.Module]) -> str:
    lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
    return f"'{lists[0]}.0'" if lists else "'<module>.0'"


# ---- reading and replacing activations ------------------------------------------------------------------------
def _first_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):  # transformers ModelOutput
        first = out[next(iter(out.keys()))]
        if isinstance(first, Tensor):
            return first
    raise SaeforgeError(f"hooked module returned {type(out).__name__}, not a tensor; hook a module that outputs activations")


def _replace_output(out: Any, new: Tensor) -> Any:
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    out[next(iter(out.keys()))] = new
    return out


def _first_input(args: tuple, kwargs: dict) -> tuple[Tensor, int | str]:
    """The tensor a ``:in`` hook means, and where it lives (position 0 or a keyword)."""
    if args and isinstance(args[0], Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], "hidden_states"
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            return v, k
    raise SaeforgeError("hooked module was called without a tensor input; hook its output instead of ':in'")


def _register(mod: nn.Module, io: str, on_act: Callable[[Tensor], Tensor | None]):
    """Attach ``on_act`` to the module's output or first input; a non-None return replaces the activation."""
    if io == "output":

        def fwd_hook(_m, _args, out):
            new = on_act(_first_output(out))
            return None if new is None else _replace_output(out, new)

        return mod.register_forward_hook(fwd_hook)

    def pre_hook(_m, args, kwargs):
        act, where = _first_input(args, kwargs)
        new = on_act(act)
        if new is None:
            return None
        if where == 0:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, where: new}

    return mod.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # no KV cache: each batch runs once
    return model(**kwargs)


def capture(
    model: nn.Module,
    hooks: Sequence[HookPoint],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    stop_early: bool = True,
) -> dict[str, Tensor]:
    """Run one forward pass and return ``{hook.name: activation [B, T, d]}`` (detached, no autograd graph).

    With ``stop_early`` the pass is aborted right after the last hooked activation (in execution order) is
    produced, so later layers and the LM head never run. A module called twice in a pass keeps its first call.
    """
    model, _ = _unwrap(model)
    if not hooks:
        raise SaeforgeError("capture needs at least one hook point; pass e.g. resid_post.0")
    points = {h.name: h for h in hooks}
    modules = dict(model.named_modules())
    acts: dict[str, Tensor] = {}
    remaining = set(points)

    def recorder(name: str) -> Callable[[Tensor], None]:
        def on_act(act: Tensor) -> None:
            if name in acts:
                return None
            acts[name] = act.detach()
            remaining.discard(name)
            if stop_early and not remaining:
                raise _StopForward
            return None

        return on_act

    handles = []
    try:
        for name, hp in points.items():
            if hp.module not in modules:
                raise SaeforgeError(f"hook {name!r} names module {hp.module!r} that this model lacks; resolve it on this model")
            handles.append(_register(modules[hp.module], hp.io, recorder(name)))
        device = next(model.parameters()).device
        am = attention_mask.to(device) if attention_mask is not None else None
        with torch.no_grad():
            try:
                _forward(model, input_ids.to(device), am)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if remaining:
        raise SaeforgeError(f"hook points {sorted(remaining)} never ran in the forward pass; pick modules on the forward path")
    return acts


@contextmanager
def splice(model: nn.Module, hook: HookPoint | str, fn: Callable[[Tensor], Tensor]) -> Iterator[HookPoint]:
    """While active, every forward pass sees ``fn(act)`` instead of the activation at ``hook``.

    Used to measure an SAE's effect on the model (``fn = sae.decode(sae.encode(act))``: the spliced-in loss).
    ``fn`` must return a tensor of the same shape.
    """
    model, _ = _unwrap(model)
    hp = resolve_hook(model, hook) if isinstance(hook, str) else hook
    modules = dict(model.named_modules())
    if hp.module not in modules:
        raise SaeforgeError(f"hook {hp.name!r} names module {hp.module!r} that this model lacks; resolve it on this model")

    delta: list[Tensor] = []  # resid_mid: what the splice changed, for the block's residual output

    def on_act(act: Tensor) -> Tensor:
        new = fn(act)
        if not isinstance(new, Tensor) or new.shape != act.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise SaeforgeError(f"splice fn at {hp.name!r} returned {got}, expected shape {tuple(act.shape)}; return a same-shape tensor")
        new = new.to(act.dtype)
        if hp.residual_block is not None:
            delta[:] = [new - act]
        return new

    def carry(out: Tensor) -> Tensor | None:
        return out + delta.pop() if delta else None

    handles = [_register(modules[hp.module], hp.io, on_act)]
    if hp.residual_block is not None:
        if hp.residual_block not in modules:
            raise SaeforgeError(f"hook {hp.name!r} names block {hp.residual_block!r} that this model lacks; resolve it on this model")
        handles.append(_register(modules[hp.residual_block], "output", carry))
    try:
        yield hp
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording(model: nn.Module, hooks: Sequence[HookPoint]) -> Iterator[dict[str, Tensor]]:
    """While active, every forward pass stores ``{hook.name: activation}`` (the last call's, graph kept) in the
    dict it yields, without changing anything: read activations and logits from one forward."""
    model, _ = _unwrap(model)
    modules = dict(model.named_modules())
    acts: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable[[Tensor], None]:
        def on_act(act: Tensor) -> None:
            acts[name] = act

        return on_act

    handles = []
    try:
        for hp in {h.name: h for h in hooks}.values():
            if hp.module not in modules:
                raise SaeforgeError(f"hook {hp.name!r} names module {hp.module!r} that this model lacks; resolve it on this model")
            handles.append(_register(modules[hp.module], hp.io, recorder(hp.name)))
        yield acts
    finally:
        for h in handles:
            h.remove()
