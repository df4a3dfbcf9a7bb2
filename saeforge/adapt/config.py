"""Configuration of ``saeforge adapt`` (LoRA around frozen SAEs) and of its end-to-end SAE baseline."""
from __future__ import annotations

from dataclasses import dataclass, field

from saeforge.config import JsonConfig


@dataclass
class AdaptConfig(JsonConfig):
    model: str = ""
    saes: list[str] = field(default_factory=list)  # SAE folders (any format saeforge reads)
    hooks: list[str] | None = None  # --hook: input hook per SAE (one for all, or one each); None: each SAE's own
    data: str = ""  # training text
    tokenizer: str | None = None
    text_field: str = "text"
    trainable: str = "lora"  # "lora": adapt the model; "sae": end-to-end SAE baseline on the same objective
    rank: int = 64  # capped per matrix at half its smaller side
    alpha: float = 32.0
    dropout: float = 0.1
    layers: str = "all"  # "all" or "after" (only the blocks after the first SAE)
    target_modules: list[str] | None = None  # default: the family's q, k, v, o, gate, up, down
    replace_special: bool = False  # False: BOS/special positions keep their original activations
    lr: float = 5e-5  # AdamW (Chen, Engels & Tegmark 2025)
    # "constant" is the paper's (its train_model keeps lr 5e-5 throughout). "cosine" / "linear": a named
    # deviation -- linear warm-up over warmup_frac of the steps, then decay to 0 at the last step.
    lr_schedule: str = "constant"
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tokens: int = 500_000
    batch_contexts: int = 8
    context_len: int = 128
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    device: str = "auto"
    model_dtype: str = "float32"  # the frozen model's weights (bfloat16/float16 for big models); LoRA stays fp32
    # HF models: spread the layers over the node's GPUs (e.g. "auto", through accelerate) instead of device; the
    # SAEs sit on the embedding's device and activations move to them and back at each splice
    device_map: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_ints(1, "rank", "tokens", "batch_contexts", "log_every")
        self.require_ints(2, "context_len")
        self.require_ints(0, "checkpoint_every", "seed")
        self.require_finite("lr", positive=True)
        self.require_finite("alpha", positive=True)
        self.require_finite("dropout", minimum=0.0, maximum=0.999)
        self.require_finite("warmup_frac", minimum=0.0, maximum=1.0)
        self.require_finite("weight_decay", "grad_clip", minimum=0.0)
        self.require(self.trainable in ("lora", "sae"), "trainable", "lora or sae")
        self.require(self.layers in ("all", "after"), "layers", "all or after")
        self.require(self.model_dtype in ("float32", "bfloat16", "float16"), "model_dtype", "float32, bfloat16 or float16")
