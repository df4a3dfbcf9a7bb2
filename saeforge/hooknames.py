"""One table between TransformerLens hook names (what SAELens and Gemma Scope files record) and saeforge's
family-independent hook aliases (docs/models.md):

=============================  ==================
TransformerLens                saeforge
=============================  ==================
``hook_embed``                 ``embed``
``blocks.N.hook_resid_pre``    ``resid_pre.N``
``blocks.N.hook_resid_post``   ``resid_post.N``
``blocks.N.hook_attn_out``     ``attn_out.N``
``blocks.N.hook_mlp_out``      ``mlp_out.N``
``blocks.N.hook_mlp_in``       ``mlp_in.N``
``blocks.N.hook_resid_mid``    ``resid_mid.N`` (llama-style, Gemma 2/3 and GPT-2 families)
=============================  ==================

:func:`to_saeforge` is applied wherever saeforge resolves a hook on a model (so an SAE imported from SAELens
with ``blocks.2.hook_resid_post`` runs on a Hugging Face model as ``resid_post.2``); :func:`to_transformerlens`
is applied by the SAELens writer, so the files it writes name hooks as SAELens users expect. Names outside
the table (module paths, other TransformerLens hooks) pass through unchanged.
"""
from __future__ import annotations

import re

from saeforge.errors import SaeforgeError

_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in")
_TL = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(_KINDS) + r")$")
_SF = re.compile(r"^(" + "|".join(_KINDS) + r")\.(\d+)$")


def to_saeforge(name: str | None) -> str | None:
    """``blocks.2.hook_resid_post`` -> ``resid_post.2``, ``hook_embed`` -> ``embed``; anything else unchanged."""
    if name is None:
        return None
    n = name.strip()
    if n == "hook_embed":
        return "embed"
    m = _TL.match(n)
    return f"{m.group(2)}.{m.group(1)}" if m else name


def to_transformerlens(name: str | None) -> str | None:
    """``resid_post.2`` -> ``blocks.2.hook_resid_post``, ``embed`` -> ``hook_embed``; anything else unchanged."""
    if name is None:
        return None
    n = name.strip()
    if n == "embed":
        return "hook_embed"
    m = _SF.match(n)
    return f"blocks.{m.group(2)}.hook_{m.group(1)}" if m else name
