"""What the evaluation modules share: the SAE's hook, and model activations shared by every SAE of one
``--all`` run.

The optional sections run once per SAE, but much of their model work does not depend on the SAE: the probe
texts' activations at the hook, N2G's contexts' activations at the hook. Inside :func:`activation_memo` such
results are computed once per (model, hook, data, sizes) and reused; outside it nothing is kept (each call
computes afresh, as a single-SAE Python call expects). The numbers are identical either way.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator

from saeforge.errors import SaeforgeError
from saeforge.sae.base import SAE

_MEMO: dict[Hashable, Any] | None = None


@contextlib.contextmanager
def activation_memo() -> Iterator[dict[Hashable, Any]]:
    """Share SAE-independent activations between the calls made inside this block (nested blocks share)."""
    global _MEMO
    outer = _MEMO
    _MEMO = {} if outer is None else outer
    try:
        yield _MEMO
    finally:
        _MEMO = outer


def memo(key: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered under ``key`` while an :func:`activation_memo` block is open."""
    if _MEMO is None:
        return compute()
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def sae_hook(sae: SAE, hook: str | None) -> str:
    """``hook`` if given, else the hook the SAE reads (``cfg.hook``)."""
    hook = hook or sae.cfg.hook
    if hook is None and len(sae.input_hooks()) > 1:
        raise SaeforgeError(f"this section reads one hook and the SAE reads several ({', '.join(sae.input_hooks())}); "
                            "leave it out (--extras) for a crosscoder")
    if hook is None:
        raise SaeforgeError("the SAE config names no hook point; pass hook='resid_post.L' (or set cfg.hook)")
    return hook
