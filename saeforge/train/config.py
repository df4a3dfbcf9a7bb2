"""Training configuration, shared by every architecture (the recipe-specific knobs live in the SAE config)."""
from __future__ import annotations

from dataclasses import dataclass

from saeforge.config import JsonConfig


@dataclass
class TrainConfig(JsonConfig):
    total_tokens: int = 5_000_000
    batch_size: int = 4096
    lr: float | None = None  # None: the architecture's recommendation (e.g. Gao et al.'s 2e-4/sqrt(n/2^14))
    betas: tuple[float, float] | None = None  # None: the recipe's (adam_defaults()), else (0.9, 0.999)
    eps: float | None = None  # None: the recipe's (e.g. Gao et al.'s 6.25e-10 for topk), else 1e-8
    warmup_steps: int | None = None  # None: min(1000, 5% of steps)
    decay_frac: float = 0.2  # linear decay to 0 over the last fraction of steps (0 disables)
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing (Gao et al. §A.2)
    init_tokens: int = 16384  # rows used for data-dependent initialisation (geometric median, scales)
    log_every: int = 25  # steps between metric lines (the only host syncs in the loop)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto | float32 | bfloat16 | float16
    kernels: str = "sparse"  # sparse: saeforge/kernels where an architecture has them; dense: plain autograd
    fused_adam: bool = True  # torch's fused Adam (one kernel per step) where the device supports it
    # under torchrun (docs/distributed.md): latent shards per replica (1: pure data parallel; 0: all processes)
    shard_latents: int = 1
    spread: bool = False  # place whole SAEs on processes instead of splitting rows (sweeps, one SAE per layer)
