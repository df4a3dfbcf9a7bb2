"""Learning-rate schedules: the SAE trainer's (linear warm-up, constant, then linear decay to zero over the
last part) and the named whole-run schedules of ``saeforge adapt``."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_frac * total_steps))
    if decay_steps > 0 and step >= total_steps - decay_steps:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


def default_warmup(total_steps: int) -> int:
    return min(1000, max(1, total_steps // 20))


LR_SCHEDULES = ("constant", "cosine", "linear")


def schedule_factor(kind: str, step: int, total: int, warmup_frac: float) -> float:
    """lr multiplier at 0-based ``step`` of ``total``: 1 for "constant"; otherwise a linear warm-up over
    ``warmup_frac`` of the steps, then a cosine or linear decay towards 0 (reached one step after the last)."""
    if kind == "constant":
        return 1.0
    warm = int(round(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)  # 0 .. (n-1)/n
    return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac
