"""Which SAEs and which model an evaluation runs: SAE sources named (sweep folders expanded), loaded with
:func:`saeforge.formats.load_sae` (the one loader), and the model they name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from saeforge.device import DTYPES, resolve_device
from saeforge.errors import SaeforgeError
from saeforge.formats import load_sae
from saeforge.models import LoadedModel, load_model
from saeforge.sae.base import SAE


def _sweep_members(folder: Path) -> list[tuple[str, str]]:
    """SAEs listed by ``folder/sweep.json`` (``{"runs": [...]}``, ``{"saes": ...}`` or a list; each entry a path
    or a dict with ``out``/``path``/``dir`` and optional ``name``); else sub-folders holding ``cfg.json``."""
    try:
        data = json.loads((folder / "sweep.json").read_text())
    except json.JSONDecodeError as e:
        raise SaeforgeError(f"{folder / 'sweep.json'} is not valid JSON ({e.msg}); fix or remove it") from None
    runs = data if isinstance(data, list) else next((data[k] for k in ("runs", "saes", "members") if k in data), [])
    items = list(runs.items()) if isinstance(runs, dict) else [(None, r) for r in runs]
    members = []
    for name, entry in items:
        path = entry if isinstance(entry, str) else next(
            (entry[k] for k in ("out", "path", "dir") if isinstance(entry, dict) and k in entry), None)
        if path is None:
            continue
        p = Path(path)
        if not p.is_absolute() and (folder / p).exists():
            p = folder / p
        name = name or (entry.get("name") if isinstance(entry, dict) else None) or p.name
        members.append((str(name), str(p)))
    if not members:
        members = [(p.name, str(p)) for p in sorted(folder.iterdir()) if p.is_dir() and (p / "cfg.json").exists()]
    if not members:
        raise SaeforgeError(f"{folder}/sweep.json lists no SAE folders; point --sae at the trained SAE folders")
    return members


def expand_sources(sources: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(name, path)`` per SAE; a folder with ``sweep.json`` expands to its members. Names are made unique."""
    pairs: list[tuple[str, str]] = []
    for s in sources:
        p = Path(s)
        if p.is_dir() and (p / "sweep.json").exists():
            pairs += _sweep_members(p)
        else:
            pairs.append((p.name or str(s), str(s)))
    return _unique(pairs)


def _unique(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: dict[str, int] = {}
    out = []
    for name, v in pairs:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", v))
    return out


def named_saes(saes: Any, device: Any) -> tuple[dict[str, SAE], dict[str, str]]:
    if isinstance(saes, (SAE, str, Path)):
        saes = [saes]
    if isinstance(saes, Mapping):
        items: list[tuple[str, Any]] = list(saes.items())
    else:
        saes = list(saes)
        items = []
        for i, s in enumerate(saes):
            items += [(f"sae{i}" if len(saes) > 1 else "sae", s)] if isinstance(s, SAE) else expand_sources([s])
        items = _unique(items)
    loaded, sources = {}, {}
    for name, s in items:
        if isinstance(s, SAE):
            loaded[name] = s
        else:
            loaded[name] = load_sae(s, device=device)
            sources[name] = str(s)
    return loaded, sources


def eval_model(model: Any, saes: Mapping[str, SAE], tokenizer: str | None, device: Any, dtype: Any,
               device_map: str | None = None) -> LoadedModel:
    if model is not None and not isinstance(model, (str, Path)):
        return model
    if model is None:
        specs = {s.cfg.model for s in saes.values()}
        if None in specs or "" in specs:
            unnamed = sorted(n for n, s in saes.items() if not s.cfg.model)
            raise SaeforgeError(f"SAE(s) {unnamed} do not record the model they were trained on; pass --model")
        if len(specs) != 1:
            raise SaeforgeError(f"the SAEs name different models {sorted(map(str, specs))}; evaluate them "
                                "separately or pass --model")
        model = specs.pop()
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise SaeforgeError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return load_model(str(model), tokenizer=tokenizer, device=resolve_device(device or "auto"),
                      device_map=device_map, **({"dtype": dt} if dt is not None else {}))


def set_hook(sae: SAE, hook: str) -> None:
    """Point ``sae`` at another input hook (``--hook``); a transcoder's target hook is left as it is."""
    if getattr(sae.cfg, "hooks", None):  # a crosscoder's field
        raise SaeforgeError(f"--hook {hook!r}: a crosscoder reads several hooks ({sae.cfg.hooks}); it cannot be moved")
    if sae.cfg.target_hook in (None, "", sae.cfg.hook):
        sae.cfg.target_hook = None if not sae.cfg.target_hook else hook
    sae.cfg.hook = hook.strip()
