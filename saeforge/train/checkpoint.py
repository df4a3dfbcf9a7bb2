"""Training checkpoints: one safetensors file (tensors) with the JSON state in its metadata, written
atomically, so a crash leaves either the previous checkpoint or the new one, never half of either."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saeforge.errors import CorruptFileError
from saeforge.io import load_safetensors_verified, save_safetensors_atomic


def flatten_optimizer(prefix: str, opt_state: dict, tensors: dict, meta: dict) -> None:
    meta[f"{prefix}param_groups"] = opt_state["param_groups"]
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}state.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    meta[f"{prefix}scalars"] = scalars


def unflatten_optimizer(prefix: str, tensors: dict, meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith(prefix + "state."):
            pid, key = name[len(prefix) + 6 :].split(".", 1)
            state.setdefault(int(pid), {})[key] = val
    for pid, d in meta.get(f"{prefix}scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    return {"state": state, "param_groups": meta[f"{prefix}param_groups"]}


def save_checkpoint(path: Path, step: int, tokens: int, runs: dict[str, dict[str, Any]], extra: dict) -> None:
    """``runs[name]`` holds ``sae`` (module), ``opt`` (optimizer), ``since_fired`` (tensor)."""
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    meta: dict[str, Any] = {"step": step, "tokens": tokens, "names": list(runs), **extra}
    for name, run in runs.items():
        p = f"{name}/"
        for k, v in run["sae"].state_dict().items():
            tensors[f"{p}model.{k}"] = v
        tensors[f"{p}since_fired"] = run["since_fired"]
        flatten_optimizer(f"{p}opt.", run["opt"].state_dict(), tensors, meta)
    save_safetensors_atomic(path, tensors, metadata={"state": json.dumps(meta)}, checksum=True)


FIX = "delete it to start over (or restore a copy), then rerun `saeforge train`"


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], torch.Tensor]:
    """Read and verify a checkpoint (checksum, structure); a damaged one is a one-line CorruptFileError."""
    tensors, metadata = load_safetensors_verified(path, FIX)
    try:
        meta = json.loads(metadata["state"])
        runs: dict[str, dict[str, Any]] = {}
        for name in meta["names"]:
            p = f"{name}/"
            sub = {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
            runs[name] = {
                "model": {k[6:]: v for k, v in sub.items() if k.startswith("model.")},
                "since_fired": sub["since_fired"],
                "opt": unflatten_optimizer("opt.", sub, {k[len(p):]: v for k, v in meta.items() if k.startswith(p)}),
            }
        rng = tensors["rng.cpu"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptFileError(f"{path} is not a complete saeforge training checkpoint (missing {e}); {FIX}") from None
    return meta, runs, rng
