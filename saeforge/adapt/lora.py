"""LoRA adapters via ``peft`` on the attention and MLP projections of a model family (its default targets:
``Family.lora_targets`` in saeforge/models/families.py).

Rank r (default 64) is capped per matrix at half its smaller side, alpha 32, dropout 0.1 — the settings the
issue fixes after Chen, Engels & Tegmark (2025, arXiv:2501.19406). Adapters go on all layers, or only on the
layers after the first spliced SAE (``layers="after"``).
"""
from __future__ import annotations

from typing import Sequence

from peft import LoraConfig, get_peft_model
from torch import nn

from saeforge.adapt.splice import layer_index
from saeforge.errors import SaeforgeError
from saeforge.models.families import FAMILIES

def _shape(mod: nn.Module) -> tuple[int, int] | None:
    w = getattr(mod, "weight", None)
    return tuple(w.shape) if w is not None and w.dim() == 2 else None


def lora_targets(model: nn.Module, family: str, min_layer: int = 0,
                 names: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """Full module names to adapt -> weight shape, restricted to blocks with index >= ``min_layer``."""
    fam = FAMILIES.get(family)
    suffixes = tuple(names) if names else (fam.lora_targets if fam is not None else ())
    if not suffixes:
        raise SaeforgeError(
            f"no default LoRA targets for model family {family!r}; pass --target-modules q_proj,v_proj,..."
        )
    out = {}
    for name, mod in model.named_modules():
        shape = _shape(mod)
        if shape is None or not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        idx = layer_index(name)
        if idx is None or idx < min_layer:
            continue
        out[name] = shape
    if not out:
        raise SaeforgeError(f"no LoRA target modules found for {suffixes} from layer {min_layer}; check --layers")
    return out


def capped_rank(rank: int, shape: tuple[int, int]) -> int:
    return max(1, min(rank, min(shape) // 2))


def add_lora(model: nn.Module, family: str, rank: int = 64, alpha: float = 32, dropout: float = 0.1,
             min_layer: int = 0, target_modules: Sequence[str] | None = None):
    """Wrap ``model`` with peft LoRA adapters (B = 0 at init, so the output is unchanged)."""
    targets = lora_targets(model, family, min_layer, target_modules)
    ranks = {name: capped_rank(rank, shape) for name, shape in targets.items()}
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets),
        rank_pattern=dict(ranks), bias="none",
    )
    return get_peft_model(model, cfg), ranks
