"""Training configuration, shared by every architecture (the recipe-specific knobs live in the SAE config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

DEAD_TOKENS = 10_000_000  # Gao et al. §A.2's dead-latent window
# Schedule-free sign descent's default window, in tokens per latent (at k = 32: 192 times the mean gap n/k between
# a latent's firings), measured with SIGNUM_AVERAGE_POWER: longer windows left the toy set's surplus latents dead
# (docs/recipes/README.md, "Seventh session")
SIGNUM_DEAD_TOKENS_PER_LATENT = 6
# schedule-free sign descent's default averaging exponent r (Defazio et al.'s and sparsify's is 0), measured; an
# architecture may set its own (SAE.signum_average_power: TopK's is 3 since the eleventh session)
SIGNUM_AVERAGE_POWER = 2.0

from saeforge.config import JsonConfig
from saeforge.train.optim import OPTIMIZERS


@dataclass
class TrainConfig(JsonConfig):
    FLAGS: ClassVar[dict[str, str]] = {"total_tokens": "--tokens"}

    total_tokens: int = 5_000_000
    batch_size: int = 4096
    lr: float | None = None  # None: from lr_rule
    # how an unset lr is chosen: "scaled" (every architecture: Gao et al.'s 2e-4/√(n/2^14) transferred to
    # the SAE's input width, saeforge.sae.base.scaled_lr) or "published" (the recipe's own constant)
    lr_rule: str = "scaled"
    # "adam", or "signum" (schedule-free sign descent, as sparsify; saeforge/train/optim.py); None: the
    # architecture's default_optimizer() (docs/recipes/README.md says which and why)
    optimizer: str | None = None
    momentum: float = 0.95  # signum: the schedule-free interpolation β (sparsify's 0.95)
    # signum: iterate k weighs (k+1)^r in the schedule-free average (Defazio et al.'s r); None: the architecture's
    # (TopK 3), else SIGNUM_AVERAGE_POWER (2; measured: docs/recipes/README.md); 0 is the paper's and sparsify's
    average_power: float | None = None
    betas: tuple[float, float] | None = None  # None: the recipe's (adam_defaults()), else (0.9, 0.999)
    eps: float | None = None  # None: the recipe's (e.g. Gao et al.'s 6.25e-10 for topk), else 1e-8
    warmup_steps: int | None = None  # None: adam min(1000, 5% of steps); signum 0
    decay_frac: float | None = None  # linear decay to 0 over the last fraction of steps; None: adam 0.2, signum 0
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    # a latent is dead after this many tokens without firing (Gao et al. §A.2: 10M); None: with adam 10M, or a
    # tenth of the run when that is shorter, so AuxK and dead-latent counts engage on short runs too; with signum
    # SIGNUM_DEAD_TOKENS_PER_LATENT · d_sae (at least one batch, at most 10M)
    dead_tokens: int | None = None
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
    # under torchrun, how data-parallel replicas read a cache: "exact" (each reads every shard and keeps its rows
    # of the one-process batches; resumes with any number of processes) or "disjoint" (each reads only its own
    # shards: 1/R of the I/O, but the batches depend on R, so a checkpoint resumes only with the same R)
    dp_read: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_ints(1, "total_tokens", "batch_size", "dead_tokens", "init_tokens", "log_every")
        self.require_ints(0, "warmup_steps", "checkpoint_every", "seed", "shard_latents")
        self.require_finite("lr", positive=True)
        self.require_finite("eps", positive=True)
        self.require_finite("decay_frac", minimum=0.0, maximum=1.0)
        self.require_finite("grad_clip", minimum=0.0)
        if self.betas is not None:
            self.require(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
                         "betas", "two numbers in [0, 1)")
        self.require(self.optimizer in (None, *OPTIMIZERS), "optimizer", " or ".join(OPTIMIZERS))
        self.require_finite("momentum", minimum=0.0, maximum=1.0)
        self.require(0 < self.momentum < 1, "momentum", "a number in (0, 1)")
        self.require_finite("average_power", minimum=0.0)
        self.require(self.kernels in ("sparse", "dense"), "kernels", "sparse or dense")
        self.require(self.lr_rule in ("scaled", "published"), "lr_rule", "scaled or published")
        self.require(self.dp_read in ("exact", "disjoint"), "dp_read", "exact or disjoint")
        self.require(self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), "dtype",
                     "auto, float32, bfloat16 or float16")

    def dead_window(self, optimizer: str, d_sae: int) -> int:
        """The dead-latent window in tokens: ``dead_tokens``, or its default for this optimizer, run length and
        dictionary size (see the field's comment)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        default = SIGNUM_DEAD_TOKENS_PER_LATENT * d_sae if optimizer == "signum" else self.total_tokens // 10
        return min(DEAD_TOKENS, max(self.batch_size, default))

    def average_power_or_default(self, arch_default: float | None = None) -> float:
        """Schedule-free sign descent's averaging exponent r: ``average_power``, else the architecture's
        (``SAE.signum_average_power``), else SIGNUM_AVERAGE_POWER."""
        if self.average_power is not None:
            return self.average_power
        return SIGNUM_AVERAGE_POWER if arch_default is None else arch_default
