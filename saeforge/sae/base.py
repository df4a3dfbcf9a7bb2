"""The one SAE interface every architecture implements, and the architecture registry.

Conventions (the same as SAELens, so its users read our weights without surprise):

* ``W_enc`` is ``[d_in, d_sae]`` and pre-activations are ``x' @ W_enc + b_enc``;
* ``W_dec`` is ``[d_sae, d_out]``: **row i is latent i's decoder direction**; ``x̂ = f @ W_dec + b_dec``;
* ``x'`` is the input after input normalisation (``input_norm``, ``input_scale``) and, when
  ``apply_b_dec_to_input`` is true, after subtracting ``b_dec`` (Gao et al.'s ``b_pre``);
* ``decode`` undoes the input normalisation, so ``decode(encode(x))`` lives in the space of ``x``
  (of the target, for transcoders);
* a skip connection (``W_skip [d_out, d_in]``), when present, is added by ``forward`` only, never by
  ``decode`` (the convention of SAELens's skip transcoders and sparsify).

An architecture subclasses :class:`SAE`, sets its config class, implements ``activate`` (pre-activations to
dense codes) and, for training, ``training_codes`` (and where needed ``training_decode`` and ``penalties``;
the shared ``training_forward`` builds the step's losses from them), and registers itself with
``@register("name")``. Saving writes ``cfg.json`` + ``sae.safetensors``; ``load`` reads them back.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saeforge.config import JsonConfig
from saeforge.errors import CorruptFileError, NonFiniteError, SaeforgeError
from saeforge.io import load_safetensors_verified, save_safetensors_atomic, write_json_atomic
from saeforge.kernels.rows import remove_parallel_component_
from saeforge.kernels.sparse_losses import fired_latents
from saeforge.kernels.topk_autograd import sparse_decode
from saeforge.sae.export import ExportSpec
from saeforge.sae.step import Codes, StepState, TrainStepInput, TrainStepOutput

FORMAT = "saeforge/1"
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")


@dataclass
class SAEConfig(JsonConfig):
    """Fields every architecture shares. Architectures subclass this to add their own."""

    # the CLI sets SAE fields with --set key=value; only these have flags of their own
    FLAGS: ClassVar[dict[str, str]] = {"d_sae": "--width", "k": "--k"}

    arch: str = ""  # the architecture; each architecture's config class fills in its own (ARCH)
    d_in: int = 0
    d_sae: int = 0
    d_out: int | None = None  # width of the target; None means d_in (an SAE, not a transcoder)
    hook: str | None = None  # input hook point
    target_hook: str | None = None  # None: reconstruct the input hook (an SAE); else a transcoder
    model: str | None = None  # model spec the SAE was trained on
    apply_b_dec_to_input: bool = True
    input_norm: str = "none"  # "none" | "layer_norm" | "constant_norm_rescale" (applied at run time)
    input_scale: float = 1.0  # dataset-level scalar multiplied into inputs (e.g. E‖x‖ = √d_in)
    output_scale: float = 1.0  # the same for the target; decode divides by it
    skip: bool = False  # learned skip connection W_skip (transcoders)
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)  # provenance: source format, trainer, ...
    format: str = FORMAT

    # the architecture this config class belongs to (set by @register on the SAE class that uses it)
    ARCH: ClassVar[str | None] = None
    # the config field that sets sparsity (k, or a penalty coefficient); a sweep varies it
    SPARSITY_FIELD: ClassVar[str | None] = None
    # named published recipes the architecture implements (the ``recipe`` field), if any
    RECIPES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _flag(cls, name: str) -> str:
        return cls.FLAGS.get(name, f"--set {name}=VALUE")

    def __post_init__(self) -> None:
        super().__post_init__()
        own = type(self).ARCH
        if not self.arch:
            if own is None:
                raise SaeforgeError(f"{type(self).__name__} belongs to no architecture: build the config with "
                                    "make_config(arch, ...) or the architecture's own config class")
            self.arch = own
        elif own is not None and self.arch != own:
            raise SaeforgeError(f"{type(self).__name__} is the config of arch {own!r}, not {self.arch!r}; "
                                f"use make_config({self.arch!r}, ...)")
        if self.d_out is None:
            self.d_out = self.d_in
        self.require_finite("input_scale", "output_scale", positive=True)
        if "target_l0" in config_fields(type(self)):  # the penalty architectures' TargetL0 mode
            self.require_finite("target_l0", positive=True)
        if self.input_norm not in INPUT_NORMS:
            raise SaeforgeError(
                f"input_norm={self.input_norm!r} is not known; use one of {', '.join(INPUT_NORMS)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0 or self.d_out <= 0:
            raise SaeforgeError(f"SAE widths must be positive (got d_in={self.d_in}, d_sae={self.d_sae}, "
                                f"d_out={self.d_out}); pass a positive --width")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise SaeforgeError(
                "apply_b_dec_to_input needs d_out == d_in; set it false for transcoders"
            )

    @property
    def is_transcoder(self) -> bool:
        return (self.target_hook is not None and self.target_hook != self.hook) or self.d_out != self.d_in


_REGISTRY: dict[str, type["SAE"]] = {}


def register(name: str):
    """Class decorator: make an architecture available under ``name`` (``--arch name``)."""

    def deco(cls: type[SAE]) -> type[SAE]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"architecture {name!r} registered twice")
        owner = cls.config_class.__dict__.get("ARCH")
        if owner is not None and owner != name:
            raise RuntimeError(f"{cls.config_class.__name__} already belongs to architecture {owner!r}")
        cls.arch = name
        cls.config_class.ARCH = name
        _REGISTRY[name] = cls
        return cls

    return deco


def architectures() -> dict[str, type["SAE"]]:
    # the registry's one function-level import: the package imports this module first, then every
    # architecture module, each of which registers itself here
    from saeforge import sae as _pkg  # noqa: F401

    return dict(_REGISTRY)


def get_arch(name: str) -> type["SAE"]:
    archs = architectures()
    if name not in archs:
        raise SaeforgeError(f"unknown SAE architecture {name!r}; choose one of {', '.join(sorted(archs))}")
    return archs[name]


def make_config(arch: str, **kwargs: Any) -> SAEConfig:
    """Build the typed config of ``arch`` from keyword arguments (unknown keys are an error)."""
    return get_arch(arch).config_class.from_dict(kwargs)


def create_sae(cfg: SAEConfig | dict[str, Any], device: str | torch.device = "cpu") -> "SAE":
    if isinstance(cfg, dict):
        if "arch" not in cfg:
            raise SaeforgeError("an SAE config needs its 'arch' (one of " + ", ".join(sorted(architectures())) + ")")
        cfg = make_config(cfg["arch"], **{k: v for k, v in cfg.items() if k != "arch"})
    return get_arch(cfg.arch)(cfg).to(device)


def latent_major(d_in: int, d_sae: int) -> nn.Parameter:
    """An encoder weight of shape ``[d_in, d_sae]`` stored latent-major (``[d_sae, d_in]`` in memory, as W_dec).

    The sparse kernels' encoder gradient comes out one row per latent (``scatter_rows``), and autograd keeps a
    gradient in its parameter's layout, so with this storage it is used as it is; with ``[d_in, d_sae]``
    storage autograd copied it transposed every step (d = 768, m = 16,384, batch 4,096: 0.013 s of a 0.80 s
    step, docs/performance.md). The dense path is unaffected (autograd's matmul backward writes the
    gradient in the weight's layout), and so are the values: the shape, the math and the saved files
    (safetensors writes tensors contiguous) are the same.
    """
    return nn.Parameter(torch.empty(d_sae, d_in).t())


class SAE(nn.Module):
    """Base class: shared parameters, normalisation, encode/decode/forward, save/load."""

    arch: ClassVar[str] = "base"
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # Architectures with a sparse training path (saeforge/kernels) use it while this is True; the
    # trainer sets it from TrainConfig.kernels ("sparse" | "dense"). Same numbers either way.
    sparse_kernels: bool = True
    chunk_rows: int | None = None  # rows per chunk of the sparse kernels (None: their default)
    has_b_enc: ClassVar[bool] = True
    # schedule-free sign descent's averaging exponent r for this architecture where TrainConfig.average_power is
    # unset; None: the trainer's shared SIGNUM_AVERAGE_POWER (saeforge/train/config.py)
    signum_average_power: ClassVar[float | None] = None

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise SaeforgeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        self.W_enc = latent_major(d_in, d_sae)
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))
        self._norm_ctx: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Default: random unit-norm decoder rows, encoder = decoder transpose, zero biases."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if self.cfg.d_out == self.cfg.d_in:
                self.W_enc.copy_(self.W_dec.T)
            else:  # drawn in [d_in, d_sae] order, so the numbers do not depend on the storage layout
                self.W_enc.copy_(nn.init.kaiming_uniform_(torch.empty(self.W_enc.shape), a=math.sqrt(5)))

    def init_from_data(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent initialisation from a sample of raw inputs/targets (recipe-specific)."""

    # ---- normalisation --------------------------------------------------------------------------
    def normalize_input(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        norm = self.cfg.input_norm
        ctx = None
        if norm == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            x = x - mu
            std = x.std(-1, keepdim=True)  # unbiased (N-1), as SAELens and OpenAI do
            x = x / (std + 1e-5)
            ctx = (mu, std)
        elif norm == "constant_norm_rescale":
            scale = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            x = x * scale
            ctx = (torch.zeros_like(scale), 1.0 / scale)
        if self.cfg.input_scale != 1.0:
            x = x * self.cfg.input_scale
        return x, ctx

    def normalize_target(self, y: Tensor) -> Tensor:
        """The target in the working space (same normalisation as the input for a plain SAE)."""
        if not self.cfg.is_transcoder:
            return self.normalize_input(y)[0]
        return y * self.cfg.output_scale if self.cfg.output_scale != 1.0 else y

    def denormalize_output(self, y: Tensor, ctx: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.cfg.output_scale != 1.0:
            y = y / self.cfg.output_scale
        if ctx is not None and not self.cfg.is_transcoder:
            mu, std = ctx
            y = y * std + mu
        return y

    # ---- inference ------------------------------------------------------------------------------
    def pre_acts(self, x_n: Tensor) -> Tensor:
        """Pre-activations from a *normalised* input."""
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        return x_n @ self.W_enc + self.b_enc

    def activate(self, h: Tensor) -> Tensor:
        """Pre-activations -> dense codes. Each architecture defines it."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations ``[..., d_sae]``. Stashes the normalisation context for ``decode``."""
        x_n, self._norm_ctx = self.normalize_input(x)
        return self.activate(self.pre_acts(x_n))

    def decode_normalized(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def decode(self, f: Tensor, norm_ctx: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Reconstruction from codes, input normalisation undone. With ``layer_norm`` inputs the
        statistics come from ``norm_ctx`` or, as in SAELens, from the last ``encode`` call."""
        if norm_ctx is None and self.cfg.input_norm != "none":
            norm_ctx = self._norm_ctx
        return self.denormalize_output(self.decode_normalized(f), norm_ctx)

    def skip_term(self, x: Tensor) -> Tensor:
        return x @ self.W_skip.T

    def forward(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        if self.cfg.skip:
            out = out + self.skip_term(x)
        return out

    # ---- training hooks (the one trainer calls these) -------------------------------------------
    def inputs_from(self, acts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Pick this SAE's input and target out of a stream batch (hook name -> [B, d])."""
        hook = self.cfg.hook
        if hook is None:
            if len(acts) != 1:
                raise SaeforgeError(f"the SAE names no hook and the stream has several: {sorted(acts)}")
            hook = next(iter(acts))
        if hook not in acts:
            raise SaeforgeError(f"the stream has no hook {hook!r} (it has {sorted(acts)}); harvest it first")
        x = acts[hook]
        target = self.cfg.target_hook
        if target is None or target == hook:
            return x, x
        if target not in acts:
            raise SaeforgeError(f"the stream has no target hook {target!r} (it has {sorted(acts)})")
        return x, acts[target]

    # ---- hook points: which activations an SAE reads and which it reconstructs ----------------------
    def input_hooks(self) -> list[str]:
        """The hook points this SAE reads, in the order :meth:`inputs_from` stacks them (default: ``cfg.hook``;
        empty when the SAE names none)."""
        return [self.cfg.hook] if self.cfg.hook else []

    def output_hooks(self) -> list[str]:
        """The hook points this SAE reconstructs, in the order :meth:`split_outputs` returns them (default: the
        target hook of a transcoder, else the input hook)."""
        hook = self.cfg.target_hook or self.cfg.hook
        return [hook] if hook else []

    def stack_inputs(self, acts: dict[str, Tensor]) -> Tensor:
        """The input ``x`` out of ``{input hook: [..., d]}`` (the hooks of :meth:`input_hooks`; default: the
        one hook's activation)."""
        hooks = [h for h in self.input_hooks() if h in acts] or list(acts)[:1]
        if not hooks:
            raise SaeforgeError(f"no activations at the SAE's input hook {self.input_hooks()}")
        return acts[hooks[0]]

    def split_outputs(self, y: Tensor) -> list[Tensor]:
        """A target or reconstruction ``[..., d_out]`` (or the shape ``forward`` returns) as one ``[..., d]``
        tensor per output hook (default: the one hook's)."""
        return [y]

    def decoder_blocks(self) -> dict[str, Tensor]:
        """Each output hook's decoder directions ``[d_sae, d]`` (row i: latent i's direction there)."""
        hooks = self.output_hooks() or [""]
        return {hooks[0]: self.W_dec}

    # ---- one training step: the shared body and the four parts an architecture defines ----------------
    def training_forward(self, inp: TrainStepInput) -> TrainStepOutput:
        """One step's losses, built the same way for every architecture: working inputs → the arch's
        :meth:`training_codes` (sparse or dense) → :meth:`training_decode` → one reconstruction loss (squared
        error over :meth:`reconstruction_denominator`, or per row) → the arch's :meth:`penalties`, each with
        its weight → one :class:`TrainStepOutput` with the latents fired and the mean L0."""
        x, y = self.working_inputs(inp)
        codes = self.training_codes(x, inp)
        y_hat = self.training_decode(codes).reshape(y.shape)
        e = y - y_hat
        denom = self.reconstruction_denominator(y)
        mse = self.reconstruction_loss(e, denom)
        state = StepState(inp, x, y, codes, y_hat, e, denom)
        losses, loss = {"mse": mse}, mse * self.reconstruction_weight()
        for name, (weight, value) in self.penalties(state).items():
            losses[name] = value
            if weight is not None:
                loss = loss + weight * value
        if codes.fired is not None:
            fired, l0 = codes.fired, codes.l0
        else:
            active = codes.active()
            fired = fired_latents(codes.idx, active, self.cfg.d_sae) if codes.sparse else \
                active.reshape(-1, active.shape[-1]).any(0)
            l0 = active.sum(-1).float().mean()
        B = y.shape[0]
        return TrainStepOutput(loss=loss, losses=losses, y_hat=y_hat.reshape(B, -1), y=y.reshape(B, -1),
                               fired=fired, l0=l0)

    def training_codes(self, x: Tensor, inp: TrainStepInput) -> Codes:
        """The codes of a working-space batch ``x`` with what the penalties need (pre-activations, AuxK
        candidates of ``inp.dead_mask``). The default: dense ``activate(pre_acts(x))``."""
        h = self.pre_acts(x)
        return Codes(f=self.activate(h), h=h)

    def training_decode(self, codes: Codes) -> Tensor:
        """ŷ in the working space: a sparse decode of (vals, idx), else ``decode_normalized(f)``."""
        if codes.sparse:
            return sparse_decode(codes.vals, codes.idx, self.W_dec, self.b_dec)
        return self.decode_normalized(codes.f)

    def reconstruction_denominator(self, y: Tensor) -> Tensor | None:
        """None: the reconstruction loss is ‖e‖² summed over features, averaged over rows (most recipes).
        A tensor: ‖e‖² summed over the batch and divided by it (Gao et al.'s normalised MSE)."""
        return None

    def reconstruction_loss(self, e: Tensor, denom: Tensor | None) -> Tensor:
        return e.pow(2).sum(-1).mean() if denom is None else e.pow(2).sum() / denom

    def reconstruction_weight(self) -> float:
        """The reconstruction term's weight in the loss (Matryoshka: the whole dictionary's prefix weight)."""
        return 1.0

    def penalties(self, s: StepState) -> dict[str, tuple[float | Tensor | None, Tensor]]:
        """The recipe's other loss terms, name → (weight, value); weight None: logged, not trained on."""
        return {}

    def training_forward_with(self, inp: TrainStepInput, sparse: bool, chunk_rows: int | None = None
                              ) -> TrainStepOutput:
        """:meth:`training_forward` on the sparse kernels or on plain autograd (tests and benchmarks compare
        the two; the trainer picks with ``TrainConfig.kernels``)."""
        prev = self.sparse_kernels, self.chunk_rows
        self.sparse_kernels, self.chunk_rows = sparse, chunk_rows
        try:
            return self.training_forward(inp)
        finally:
            self.sparse_kernels, self.chunk_rows = prev

    # ---- the training contract: what the trainer asks of every architecture (defaults here) ----------
    def published_lr(self) -> float:
        """The recipe's own learning rate, as its paper or reference code gives it (``lr_rule="published"``)."""
        return 2e-4

    def recommended_lr(self, total_tokens: int | None = None, rule: str = "scaled", optimizer: str = "adam") -> float:
        """The learning rate used when ``TrainConfig.lr`` is unset (``TrainConfig.lr_rule`` picks the rule):
        ``"scaled"`` (default) is :func:`scaled_lr` for this SAE's widths and ``optimizer``, the same rule for
        every architecture (with Adam, times the recipe's :meth:`adam_lr_scale`); ``"published"`` is the recipe's
        constant (:meth:`published_lr`) for Adam, and sparsify's 5e-3/√(n/2^14) for schedule-free sign descent."""
        if rule not in ("scaled", "published"):
            raise SaeforgeError(f"unknown lr rule {rule!r}; use 'scaled' or 'published'")
        if rule == "published":
            return SIGNUM_PUBLISHED * math.sqrt(LR_REFERENCE[2] / self.cfg.d_sae) if optimizer == "signum" \
                else self.published_lr()
        return scaled_lr(self.cfg.d_in, self.cfg.d_sae, optimizer, self.adam_lr_scale())

    def adam_lr_scale(self) -> float:
        """The multiple of Gao et al.'s lr (transferred to ``d_in``) that the shared Adam rule gives this recipe:
        ``LR_SCALE``, measured on TopK, where more lr brings dead latents (docs/recipes/README.md)."""
        return LR_SCALE

    def default_optimizer(self) -> str:
        """The optimizer used where ``TrainConfig.optimizer`` is unset: ``"adam"`` (every paper's), unless an
        architecture measured better with ``"signum"`` (saeforge/train/optim.py; docs/recipes/README.md)."""
        return "adam"

    def adam_defaults(self) -> dict[str, Any]:
        """Adam ``betas`` / ``eps`` of the recipe (used where ``TrainConfig`` leaves them unset)."""
        return {}

    def resample_request(self, tokens_before: int, tokens_after: int, total_tokens: int) -> int:
        """Rows of upcoming data the trainer should hand to :meth:`resample` after this step (0: none)."""
        return 0

    def resample(self, x: Tensor, y: Tensor, since_fired: Tensor, opt: torch.optim.Optimizer,
                 generator: torch.Generator) -> Tensor:
        """Re-initialise dead latents from data; returns the indices reset. Only called after a positive
        :meth:`resample_request`."""
        raise NotImplementedError(f"{type(self).__name__} does not resample")

    def after_metrics(self, metrics: dict[str, float], step: int, total_steps: int) -> None:
        """Called with each metrics line (the loop's host sync), e.g. to steer a sparsity coefficient."""

    def train_step(self, inp: TrainStepInput) -> TrainStepOutput:
        """What the trainer calls: ``training_forward`` plus, with ``cfg.skip``, the learned skip term. The
        architecture reconstructs the target minus the skip term (``working_inputs`` subtracts it, with its
        gradient, so ``W_skip`` trains through every architecture's loss); the returned ``y``/``y_hat`` have
        it added back, so the logged FVU is that of the whole output, as ``forward`` computes it."""
        if not self.cfg.skip:
            return self.training_forward(inp)
        skip = self.working_skip(inp.x)
        out = self.training_forward(dataclasses.replace(inp, skip=skip))
        s = skip.detach()
        out.y, out.y_hat = out.y + s.reshape(out.y.shape), out.y_hat + s.reshape(out.y_hat.shape)
        return out

    def working_skip(self, x: Tensor) -> Tensor:
        """``skip_term(x)`` mapped into the working (normalised target) space: ``forward`` adds it after
        ``decode`` undid the normalisation, so here it is scaled by ``output_scale`` and, for a layer-normed
        SAE, divided by the input's standard deviation."""
        s = self.skip_term(x)
        if self.cfg.output_scale != 1.0:
            s = s * self.cfg.output_scale
        if self.cfg.input_norm != "none" and not self.cfg.is_transcoder:
            _, (_, std) = self.normalize_input(x)
            s = s / std
        return s

    def before_optimizer_step(self) -> None:
        """Called after backward, before the optimizer (e.g. remove gradient parallel to decoder rows)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after the optimizer step (e.g. renormalise decoder rows)."""

    def folded(self) -> "SAE":
        """An inference-equivalent copy in the form saved to disk (e.g. decoder norms folded)."""
        return self

    # ---- helpers shared by architectures --------------------------------------------------------
    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component parallel to each (unit) decoder row (Gao et al. 2024, §2.4)."""
        if self.W_dec.grad is None:
            return
        remove_parallel_component_(self.W_dec.detach(), self.W_dec.grad)

    def working_inputs(self, inp: TrainStepInput) -> tuple[Tensor, Tensor]:
        x_n, _ = self.normalize_input(inp.x)
        y_n = x_n if inp.y is inp.x else self.normalize_target(inp.y)
        if inp.skip is not None:
            y_n = y_n - inp.skip.reshape(y_n.shape)
        return x_n, y_n

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path, fold: bool = True) -> Path:
        """Write ``cfg.json`` + ``sae.safetensors`` (each atomically) into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sae = self.folded() if fold else self
        tensors = {k: v.detach().float() for k, v in sae.state_dict().items()}
        save_safetensors_atomic(path / "sae.safetensors", tensors, metadata={"format": FORMAT}, checksum=True)
        write_json_atomic(path / "cfg.json", sae.cfg.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SAE":
        path = Path(path)
        cfg_path, w_path = path / "cfg.json", path / "sae.safetensors"
        if not cfg_path.exists() or not w_path.exists():
            raise SaeforgeError(f"{path} is not a saeforge SAE folder (needs cfg.json and sae.safetensors)")
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{cfg_path} is not valid JSON ({e}); restore it or train the SAE again") from None
        if not isinstance(d, dict) or "arch" not in d:
            raise SaeforgeError(f"{cfg_path} has no 'arch' key; load foreign formats with saeforge.load_sae")
        sae = create_sae(d, device="cpu")
        state, _ = load_safetensors_verified(w_path, "restore it or train the SAE again")
        missing = set(sae.state_dict()) - set(state)
        unexpected = set(state) - set(sae.state_dict())
        if missing or unexpected:
            raise SaeforgeError(
                f"{w_path}: tensors do not match arch {d['arch']!r} (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )
        shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        wrong = sorted(k for k, v in state.items() if tuple(v.shape) != shapes[k])
        if wrong:
            raise SaeforgeError(f"{w_path}: tensor shapes do not match {cfg_path} ({wrong[0]} is "
                                f"{tuple(state[wrong[0]].shape)}, cfg says {shapes[wrong[0]]}); the two files come "
                                "from different SAEs: restore the pair")
        check_finite_weights(state, w_path)
        sae.load_state_dict(state)
        return sae.to(device)

    # ---- export: what checkpoint formats need to know (saeforge/formats) ----------------------------
    # config values a checkpoint read from another library gets unless the file says otherwise
    IMPORT_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def export_spec(self) -> ExportSpec | None:
        """How this SAE computes its codes, as :class:`ExportSpec`; None (the default): no foreign format can
        hold it, and writers refuse it with one line naming the architecture."""
        return None

    def extra_repr(self) -> str:
        c = self.cfg
        return f"arch={c.arch}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}, hook={c.hook}"


def check_finite_weights(state: dict[str, Tensor], where: object) -> None:
    """Refuse an SAE with NaN/Inf weights (it would give NaN metrics everywhere downstream)."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{where}: SAE weight {k} holds NaN/Inf values; this SAE is unusable: "
                                 "train it again (saeforge train stops at the first non-finite loss)")


LR_REFERENCE = (2e-4, 768, 2**14)  # Gao et al.'s lr at GPT-2 small's width with 2^14 latents
SIGNUM_PUBLISHED = 5e-3  # sparsify's signum lr at 2^14 latents (its trainer: 5e-3 / √(n / 2^14))
SIGNUM_LR0 = 2.5e-3  # schedule-free sign descent at 2^14 latents, measured (docs/recipes/README.md)
LR_SCALE = 2.5  # measured: short (3M-token) runs train best above the transferred value (docs/recipes/README.md)
# measured: the recipes without a decoder-norm constraint (ReLU anthropic2024, JumpReLU anthropic2025) steered to a
# target L0 train best at 4 × LR_SCALE, the largest multiple with no dead latents on stories260K
# (docs/recipes/README.md)
FREE_NORM_LR_SCALE = 4 * LR_SCALE


def scaled_lr(d_in: int, d_sae: int, optimizer: str = "adam", scale: float = LR_SCALE) -> float:
    """The default learning rate of every architecture.

    Adam: Gao et al.'s 2e-4 / √(n / 2^14), fitted at GPT-2 small's width d = 768, transferred to width
    ``d_in`` as lr ∝ 1/√d_in, times ``scale`` (LR_SCALE, or the recipe's ``adam_lr_scale()``). Why 1/√d: Adam
    moves each weight by about lr per step whatever the scale of its gradient, and decoder rows (and encoder
    columns at init) have a fixed norm, so their entries are of size 1/√d. The angle a latent's direction turns per step is thus ≈ lr·√d; keeping it equal
    to its value at the reference width gives lr ∝ 1/√d (docs/recipes/README.md shows the measurements, at
    d = 32, 64, 128 and 384).

    Schedule-free sign descent (``optimizer="signum"``): SIGNUM_LR0 / √(n / 2^14), sparsify's law with half its
    constant. Measured at d = 64, 128 and 384 (docs/recipes/README.md), the best lr did not depend on d_in (unlike
    Adam's), so this rule has no width factor."""
    lr0, d0, n0 = LR_REFERENCE
    if optimizer == "signum":
        return SIGNUM_LR0 * math.sqrt(n0 / d_sae)
    return scale * lr0 * math.sqrt(n0 / d_sae) * math.sqrt(d0 / d_in)


def config_fields(cfg_cls: type[SAEConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg_cls)]


def fvu(y: Tensor, y_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: ‖y − ŷ‖² / ‖y − mean(y)‖² over the batch."""
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
