"""Learning-rate schedule: linear warm-up, constant, then linear decay to zero over the last part."""
from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_frac * total_steps))
    if decay_steps > 0 and step >= total_steps - decay_steps:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


def default_warmup(total_steps: int) -> int:
    return min(1000, max(1, total_steps // 20))
