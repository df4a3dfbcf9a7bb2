"""The train-step contract's types (SAELens's split between a step's input and output): what the trainer hands
an SAE (:class:`TrainStepInput`), the codes an architecture computes (:class:`Codes`), what the shared
``SAE.training_forward`` hands its penalties (:class:`StepState`) and what one step returns
(:class:`TrainStepOutput`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class TrainStepInput:
    """What the trainer hands an SAE for one step (SAELens's split between step input and output)."""

    x: Tensor  # [B, d_in] raw input activations
    y: Tensor  # [B, d_out] raw target activations (== x for an SAE)
    step: int
    total_steps: int
    dead_mask: Tensor | None = None  # [d_sae] bool, latents that have not fired for dead_tokens
    skip: Tensor | None = None  # [B, d_out] the skip term in the working space (set by SAE.train_step)
    global_rows: int | None = None  # rows of the global batch under data parallelism (None: x is the whole batch)


@dataclass
class TrainStepOutput:
    """What one training forward returns. Every tensor stays on device (no host sync)."""

    loss: Tensor  # scalar to backprop
    losses: dict[str, Tensor]  # named scalar parts, e.g. {"mse": ..., "aux": ...}
    y_hat: Tensor  # [B, d_out] reconstruction in the SAE's working (normalised) space
    y: Tensor  # [B, d_out] target in the same space
    fired: Tensor  # [d_sae] bool: latents active at least once in this batch
    l0: Tensor  # scalar: mean number of active latents per row


@dataclass
class Codes:
    """One training step's latent codes, as an architecture's :meth:`SAE.training_codes` returns them:
    sparse (``vals``/``idx``, the k kept values of each row and their latents) or dense (``f``)."""

    f: Tensor | None = None  # [B, d_sae] dense codes, or
    vals: Tensor | None = None  # [B, k] kept values ...
    idx: Tensor | None = None  # [B, k] ... and their latent indices
    h: Tensor | None = None  # [B, d_sae] dense pre-activations, when the architecture computed them
    selection: Any = None  # the sparse kernels' selection (saeforge.kernels.selectors.TopKCodes): AuxK pairs
    extra: dict[str, Any] = field(default_factory=dict)  # what an architecture's penalties need besides
    fired: Tensor | None = None  # set by architectures that count firing themselves (latent sharding)
    l0: Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.vals is not None

    def active(self) -> Tensor:
        return (self.vals if self.sparse else self.f) > 0


@dataclass
class StepState:
    """What the shared :meth:`SAE.training_forward` hands an architecture's :meth:`SAE.penalties`."""

    inp: TrainStepInput
    x: Tensor  # working-space input
    y: Tensor  # working-space target (the skip term already subtracted)
    codes: Codes
    y_hat: Tensor  # reconstruction in the working space
    e: Tensor  # y - y_hat
    denom: Tensor | None  # the reconstruction loss's denominator (None: mean over rows)
