"""How an SAE describes its inference computation to the checkpoint formats (:class:`ExportSpec`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from saeforge.errors import SaeforgeError


@dataclass
class ExportSpec:
    """How an SAE computes its codes, in terms every checkpoint format can name (saeforge/formats reads this
    instead of branching on architecture names). Tensors are detached float32 on the CPU, in saeforge's
    orientation; ``W_enc``/``b_enc``/``W_dec``/``b_dec``/``W_skip`` are read from the state dict as usual.

    ``activation`` is one of:

    * ``"relu"``: f = ReLU(h);
    * ``"topk"``: f = ReLU(top-k of h per row), ``k`` set;
    * ``"jumprelu"``: f = h · 1[h > θ], ``tensors["threshold"]`` per latent ``[d_sae]``;
    * ``"batchtopk"``: f = ReLU(h) · 1[ReLU(h) > θ] with one global ``tensors["threshold"]`` (shape ``[]``) at
      inference, ``k`` the batch top-k used in training; ``groups`` for nested (Matryoshka) latent groups;
    * ``"gated"``: f = 1[x' W_enc + b_gate > 0] · ReLU(x' (W_enc ⊙ exp r_mag) + b_mag), ``tensors`` holds
      ``b_gate``, ``r_mag``, ``b_mag`` (no ``b_enc``).

    ``encoder_biases`` lists every pre-activation bias with the name of the tensor whose exp scales ``W_enc``'s
    columns for it (None: plain ``W_enc``), so a writer can move the ``b_dec`` subtraction into the biases.
    ``training`` names the saeforge architecture and ``details`` its training settings a format may record
    (provenance only; writers must not branch on them).
    """

    activation: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    k: int | None = None
    groups: list[int] | None = None
    group_weights: list[float] | None = None
    encoder_biases: tuple[tuple[str, str | None], ...] = (("b_enc", None),)
    training: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # training settings a format may record (multi_topk)

    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("relu", "topk", "jumprelu", "batchtopk", "gated")

    def __post_init__(self) -> None:
        if self.activation not in self.ACTIVATIONS:
            raise SaeforgeError(f"export activation {self.activation!r} is not one of {', '.join(self.ACTIVATIONS)}")
