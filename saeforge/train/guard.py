"""What keeps a training run honest, outside the hot loop: finiteness checks, the resume comparison, and
trimming ``metrics.jsonl`` back to a checkpoint.

The trainer accumulates losses (and gradient norms) on the device and calls :func:`check_finite` only where
it syncs with the host anyway (metric lines, checkpoints), so the loop gains no host sync per step. A NaN or
an infinity stops the run with one line before anything non-finite is written: the last checkpoint on disk
stays the last good one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from saeforge.errors import NonFiniteError, SaeforgeError
from saeforge.io import write_text_atomic

# TrainConfig fields a resumed run may change with --allow-change (nothing else: they would silently give a
# run that matches neither setting). total_tokens lengthens/shortens the LR schedule from the resume point on.
RESUME_CHANGEABLE = ("total_tokens", "log_every", "checkpoint_every", "device")


def diverged(name: str, what: str, value: float, step: int, last_good: int | None) -> NonFiniteError:
    who = f"SAE {name!r}" if name else "the SAE"
    kept = (f"the checkpoint of step {last_good} is kept (the last good one)" if last_good
            else "no checkpoint was written")
    return NonFiniteError(
        f"training diverged: the {what} of {who} became {value} by step {step}; {kept} and no SAE was saved; "
        "lower --lr (or raise --grad-clip), check the data for NaN/Inf rows, then rerun"
    )


def check_finite(name: str, values: dict[str, float], step: int, last_good: int | None) -> None:
    for key, v in values.items():
        if not math.isfinite(v):
            raise diverged(name, key, v, step, last_good)


def check_finite_params(name: str, module: torch.nn.Module, step: int, last_good: int | None) -> None:
    """One host sync: are all parameters finite? (called before a checkpoint or the final save)."""
    params = [p.detach() for p in module.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        bad = next(n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all()))
        raise diverged(name, f"weight {bad}", float("nan"), step, last_good)


def check_finite_state(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], fix: str) -> None:
    for key, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{path} holds non-finite values in {key}, so it cannot be resumed; {fix}")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def compare_resume(path: Path, saved: dict[str, Any], current: dict[str, Any], allow: Iterable[str],
                   hint: str | None = None) -> None:
    """Refuse to resume unless ``current`` equals ``saved`` (both ``{"train": ..., "saes": ..., "data": ...}``);
    ``allow`` names TrainConfig fields from :data:`RESUME_CHANGEABLE` that may differ."""
    allow = set(allow)
    bad = sorted(allow - set(RESUME_CHANGEABLE))
    if bad:
        raise SaeforgeError(f"--allow-change {','.join(bad)}: only {', '.join(RESUME_CHANGEABLE)} may change "
                            "on resume; start a new --out for other changes")
    diffs = []
    for part in ("train", "saes", "data"):
        if saved.get(part) is None:  # a checkpoint from an older saeforge, or a stream without identity
            continue
        old, new = saved[part], current.get(part)
        if part == "train":
            old = {k: v for k, v in old.items() if k not in allow}
            new = {k: v for k, v in (new or {}).items() if k not in allow}
        diffs += [f"{part} {d}" for d in _diff(old, new)]
    if diffs:
        hint = hint or f"allow a safe change with --allow-change ({', '.join(RESUME_CHANGEABLE)}), "
        raise SaeforgeError(
            f"--resume: {path} was made with other settings ({'; '.join(diffs)}); rerun with the original ones, "
            f"{hint}or use a new --out"
        )


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metric lines after ``step`` (written after the checkpoint a run resumes from) and any torn
    last line, so a resumed run never repeats a step."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)

    write_text_atomic(path, "".join(x + "\n" for x in keep))
