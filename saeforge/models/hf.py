"""Load Hugging Face models (hub id or local folder) for activation work.

``AutoConfig`` decides the kind: decoder-only language models load with ``AutoModelForCausalLM`` (so logits and
splice-in loss work), encoders such as BERT with ``AutoModel`` (hidden states only).
"""
from __future__ import annotations

from pathlib import Path

import torch

from saeforge.errors import SaeforgeError

# model_types that appear in the causal-LM auto mapping only as an optional decoder variant (BertLMHeadModel...)
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "roberta-prelayernorm",
     "megatron-bert", "data2vec-text", "rembert", "xmod", "distilbert", "albert", "deberta", "deberta-v2", "mpnet",
     "modernbert", "nomic_bert"}
)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".bin", ".safetensors", ".pt"))


def check_spec(spec: str) -> None:
    """Raise a clear error for a local-looking path that does not exist (instead of a confusing hub lookup)."""
    p = Path(spec).expanduser()
    if not p.exists() and _looks_like_path(spec):
        raise SaeforgeError(f"model path not found: {spec}; pass an existing folder, a llama2.c .bin or a hub id")
    if p.is_file():
        raise SaeforgeError(f"{spec} is a file but not a llama2.c checkpoint; pass a Hugging Face model folder or hub id")


def load_config(spec: str):
    from transformers import AutoConfig

    check_spec(spec)
    try:
        return AutoConfig.from_pretrained(str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec)
    except (OSError, ValueError, KeyError) as e:
        raise SaeforgeError(f"cannot load a model config from {spec!r} ({_first_line(e)}); pass a HF folder or a reachable hub id") from None


def is_causal_config(config) -> bool:
    """Decoder-only language model (gets an LM head) vs encoder (BERT-style, hidden states only)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        raise SaeforgeError(f"encoder-decoder models ({config.model_type}) are not supported; use a decoder-only or encoder model")
    mt = config.model_type
    if mt in ENCODER_TYPES:
        return bool(getattr(config, "is_decoder", False))
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 calls it ``dtype``; older versions only know ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_hf(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            device_map: str | dict | None = None):
    """Returns ``(model, config, is_causal)`` with the model in eval mode and gradients off.

    ``device_map`` (e.g. ``"auto"``) places the layers over the GPUs of the node through ``accelerate``
    (models that do not fit on one); ``device`` is then ignored."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_config(spec)
    causal = is_causal_config(config)
    cls = AutoModelForCausalLM if causal else AutoModel
    src = str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        model = cls.from_pretrained(src, **_dtype_kwargs(dtype), **extra)
    except ImportError as e:
        raise SaeforgeError(f"--device-map needs the accelerate package ({_first_line(e)}); pip install accelerate") from None
    except (OSError, ValueError, KeyError) as e:
        raise SaeforgeError(f"cannot load model weights from {spec!r} ({_first_line(e)}); check the folder or hub id") from None
    if device_map is None:
        model = model.to(device)
    return model.eval().requires_grad_(False), config, causal


def text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config
