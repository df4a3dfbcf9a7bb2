"""Acausal crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing", transformer-circuits.pub/2024/crosscoders): one dictionary read from and written to several hook
points at once.

    f = ReLU(Σ_l W_enc^l x_l + b_enc),   x̂_l = f W_dec^l + b_dec^l,
    L = Σ_l ‖x_l − x̂_l‖² + λ Σ_i f_i Σ_l ‖W_dec,i^l‖     (decoder norms summed over hooks).

The rest is Anthropic's April 2024 recipe, which the crosscoder paper builds on: each hook scaled so that
E‖x_l‖ = √d, decoder blocks initialised as random directions of norm 0.1 with W_enc^l = (W_dec^l)ᵀ, λ warmed
up over the first 5% of steps, lr 5e-5, decoder norms folded into the encoder when saved.

Layout (also on disk, in ``sae.safetensors``; the convention of Anthropic's crosscoder write-up and of
dictionary_learning's ``CrossCoder``): W_enc [n_hooks, d, m], b_enc [m], W_dec [m, n_hooks, d],
b_dec [n_hooks, d]; ``cfg.json`` lists ``hooks`` (their order is the first axis) and ``hook_scales``.
``cfg.d_in`` = ``cfg.d_out`` = n_hooks · d. Inputs are ``[B, n_hooks, d]`` (or flattened ``[B, n_hooks·d]``);
``decode`` returns ``[B, n_hooks, d]`` and ``forward`` returns the shape it was given.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from saeforge.errors import SaeforgeError
from saeforge.sae.base import SAE, SAEConfig, StepState, register
from saeforge.sae.functional import TARGET_L0_START, TargetL0, fold_decoder_norms_, norm_scale, ramp


L1_DEFAULT = 5.0  # λ of the April 2024 recipe on √d-scaled hooks, as ReLU's


@dataclass
class CrosscoderConfig(SAEConfig):
    apply_b_dec_to_input: bool = False
    hooks: list[str] = field(default_factory=list)  # the hook points read and reconstructed, in order
    hook_scales: list[float] | None = None  # per-hook E‖x_l‖ = √d scales (estimated before training)
    l1_coefficient: float | None = None  # λ; None: 5.0, or 0.5 when target_l0 steers it (as ReLU's)
    target_l0: float | None = None  # steer the coefficient to this mean L0 (TargetL0); None: fixed
    l1_warmup_frac: float = 0.05
    decoder_init_norm: float = 0.1

    SPARSITY_FIELD: ClassVar[str] = "l1_coefficient"

    def __post_init__(self) -> None:
        if self.l1_coefficient is None:
            self.l1_coefficient = L1_DEFAULT if self.target_l0 is None else L1_DEFAULT * TARGET_L0_START
        super().__post_init__()
        L = len(self.hooks)
        if L < 1 or len(set(self.hooks)) != L:
            raise SaeforgeError("a crosscoder needs distinct hook points: set hooks=[...] (e.g. --hook a,b)")
        if self.d_in % L or self.d_out != self.d_in:
            raise SaeforgeError(f"crosscoder d_in={self.d_in} must be n_hooks ({L}) × the hook width, = d_out")
        if self.input_norm != "none" or self.skip or self.apply_b_dec_to_input:
            raise SaeforgeError("crosscoders support input_norm=none, no skip and apply_b_dec_to_input=false")
        if self.hook_scales is None:
            self.hook_scales = [1.0] * L
        if len(self.hook_scales) != L:
            raise SaeforgeError("hook_scales needs one scale per hook")

    @property
    def d_hook(self) -> int:
        return self.d_in // len(self.hooks)


@register("crosscoder")
class CrosscoderSAE(TargetL0, SAE):
    config_class = CrosscoderConfig
    cfg: CrosscoderConfig

    def __init__(self, cfg: CrosscoderConfig):
        nn.Module.__init__(self)  # own parameter layout (see the module docstring)
        if not isinstance(cfg, CrosscoderConfig):
            raise SaeforgeError("CrosscoderSAE needs a CrosscoderConfig")
        self.cfg = cfg
        L, d, m = len(cfg.hooks), cfg.d_hook, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(L, d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, L, d))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self._norm_ctx = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.W_dec)
            self.W_dec.mul_(self.cfg.decoder_init_norm / self.W_dec.norm(dim=2, keepdim=True).clamp_min(1e-12))
            self.W_enc.copy_(self.W_dec.permute(1, 2, 0))

    # ---- layout -----------------------------------------------------------------------------------
    def _stack(self, x: Tensor) -> Tensor:
        L, d = len(self.cfg.hooks), self.cfg.d_hook
        if x.shape[-2:] == (L, d):
            return x
        if x.shape[-1] == L * d:
            return x.reshape(*x.shape[:-1], L, d)
        raise SaeforgeError(f"crosscoder input must be [..., {L}, {d}] or [..., {L * d}], got {list(x.shape)}")

    def _scales(self, like: Tensor) -> Tensor:
        return torch.tensor(self.cfg.hook_scales, dtype=like.dtype, device=like.device)[:, None]

    def inputs_from(self, acts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        missing = [h for h in self.cfg.hooks if h not in acts]
        if missing:
            raise SaeforgeError(f"the stream has no hook(s) {missing} (it has {sorted(acts)}); harvest them first")
        x = torch.stack([acts[h] for h in self.cfg.hooks], dim=-2)
        return x, x

    def input_hooks(self) -> list[str]:
        return list(self.cfg.hooks)

    def output_hooks(self) -> list[str]:
        return list(self.cfg.hooks)

    def stack_inputs(self, acts: dict[str, Tensor]) -> Tensor:
        return self.inputs_from(acts)[0]

    def split_outputs(self, y: Tensor) -> list[Tensor]:
        return list(self._stack(y).unbind(-2))

    def decoder_blocks(self) -> dict[str, Tensor]:
        return {h: self.W_dec[:, i] for i, h in enumerate(self.cfg.hooks)}

    # ---- inference --------------------------------------------------------------------------------
    def normalize_input(self, x: Tensor) -> tuple[Tensor, None]:
        x = self._stack(x)
        return x * self._scales(x), None

    def normalize_target(self, y: Tensor) -> Tensor:
        return self.normalize_input(y)[0]

    def denormalize_output(self, y: Tensor, ctx: None = None) -> Tensor:
        return y / self._scales(y)

    def pre_acts(self, x_n: Tensor) -> Tensor:
        return torch.einsum("...ld,ldm->...m", x_n, self.W_enc) + self.b_enc

    def activate(self, h: Tensor) -> Tensor:
        return h.relu()

    def decode_normalized(self, f: Tensor) -> Tensor:
        return torch.einsum("...m,mld->...ld", f, self.W_dec) + self.b_dec

    def decode(self, f: Tensor, norm_ctx: None = None) -> Tensor:
        return self.denormalize_output(self.decode_normalized(f))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)).reshape(x.shape)

    def decoder_norms(self) -> Tensor:
        """Σ_l ‖W_dec,i^l‖ — the crosscoder's per-latent decoder norm (the L1 of per-hook norms)."""
        return self.W_dec.norm(dim=2).sum(1)

    # ---- training ---------------------------------------------------------------------------------
    def published_lr(self) -> float:
        return 5e-5

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        x = self._stack(x)
        self.cfg.hook_scales = [norm_scale(x[:, l]) for l in range(x.shape[1])]

    def reconstruction_loss(self, e: Tensor, denom: Tensor | None) -> Tensor:
        """Σ_l ‖x_l − x̂_l‖², averaged over rows."""
        return e.pow(2).sum(-1).mean(0).sum()

    def penalties(self, s: StepState) -> dict[str, tuple[float | None, Tensor]]:
        """λ Σ_i f_i Σ_l ‖W_dec,i^l‖, and each hook's reconstruction error (logged)."""
        sparsity = (s.codes.f * self.decoder_norms()).sum(-1).mean()
        out = {"sparsity": (self.cfg.l1_coefficient * self.sparsity_ramp(s.inp.step, s.inp.total_steps), sparsity)}
        per_hook = s.e.detach().pow(2).sum(-1).mean(0)
        out.update({f"mse:{h}": (None, per_hook[i]) for i, h in enumerate(self.cfg.hooks)})
        return out

    def sparsity_ramp(self, step: int, total_steps: int) -> float:
        return ramp(step, self.cfg.l1_warmup_frac * total_steps)

    def folded(self) -> "CrosscoderSAE":
        """Summed decoder norms folded into W_enc and b_enc (outputs and L0 unchanged)."""
        out = copy.deepcopy(self)
        fold_decoder_norms_(out, out.decoder_norms())
        return out

