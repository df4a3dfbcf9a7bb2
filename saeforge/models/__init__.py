"""Model loading: one call turns a llama2.c ``.bin``, a HF folder or a hub id into a :class:`LoadedModel`.

Every model comes back as a ``transformers`` module in eval mode with gradients off, plus a tokenizer speaking the
:class:`~saeforge.models.tokenizer.Tokenizer` protocol, so hooks and harvesting never special-case the source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saeforge.distributed import launched
from saeforge.errors import SaeforgeError
from saeforge.models.tokenizer import HFTokenizer, Llama2cTokenizer, Tokenizer, load_tokenizer
from saeforge.models.llama2c import is_llama2c_checkpoint
from saeforge.paths import require_exists
from saeforge.models.llama2c import find_tokenizer, load_llama2c
from saeforge.models.hf import load_hf, text_config

__all__ = ["LoadedModel", "load_model", "Tokenizer", "HFTokenizer", "Llama2cTokenizer", "load_tokenizer"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    family: str
    spec: str
    is_causal: bool
    d_model: int
    n_layers: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, V]`` (no autograd graph). Encoders have no LM head and raise."""
        if not self.is_causal:
            raise SaeforgeError(f"{self.spec} is an encoder ({self.family}) without next-token logits; use a causal LM for loss metrics")
        dev = self.device
        am = attention_mask.to(dev) if attention_mask is not None else None
        with torch.no_grad():
            # on the input's device: with a device_map the LM head may sit on another GPU
            return self.model(input_ids=input_ids.to(dev), attention_mask=am, use_cache=False).logits.to(dev)


def _llama2c_path(spec: str) -> Path | None:
    if spec.startswith("llama2c:"):
        p = Path(spec[len("llama2c:") :]).expanduser()
        if not p.is_file():
            raise SaeforgeError(f"llama2.c checkpoint not found: {p}; check the path after 'llama2c:'")
        return p
    p = Path(spec).expanduser()
    if p.suffix == ".bin" and p.is_file() and is_llama2c_checkpoint(p):
        return p
    return None


def _check_tokenizer(tok: Tokenizer, model: torch.nn.Module, spec: str) -> Tokenizer:
    """Catch a tokenizer that cannot drive this model (transformers 5 even builds an empty one from no files)."""
    n_emb = model.get_input_embeddings().num_embeddings
    if tok.vocab_size <= len(tok.special_ids) or tok.vocab_size > n_emb:
        raise SaeforgeError(
            f"the tokenizer for {spec} has {tok.vocab_size} tokens but the model has {n_emb} embeddings; pass --tokenizer PATH"
        )
    return tok


def load_model(
    spec: str,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load ``spec``: ``llama2c:PATH`` / a llama2.c ``.bin``, a local HF folder, or a hub id.

    ``tokenizer`` overrides the tokenizer (a llama2.c ``.bin`` or anything ``AutoTokenizer`` takes). For llama2.c
    it defaults to ``tokenizer.bin``/``tok*.bin`` next to the checkpoint; for HF to the model's own tokenizer.
    ``dtype`` is the weights' dtype (bf16/fp16 for big models); ``device_map`` (HF models, e.g. ``"auto"``) spreads
    the layers over the GPUs of the node instead of putting the model on ``device``.
    """

    spec = str(spec)
    require_exists(spec[len("llama2c:"):] if spec.startswith("llama2c:") else spec, "model", "--model")
    if tokenizer is not None:
        require_exists(tokenizer, "tokenizer", "--tokenizer")
    if device_map is not None and launched():
        raise SaeforgeError("--device-map spreads one model over the node's GPUs but torchrun gives each process its "
                            "own GPU; use one or the other")
    l2c = _llama2c_path(spec)
    if l2c is not None:

        if device_map is not None:
            raise SaeforgeError("--device-map is for Hugging Face models; a llama2.c model loads on one --device")
        model, hdr = load_llama2c(l2c, device=device, dtype=dtype)
        tok_path = tokenizer if tokenizer is not None else find_tokenizer(l2c, hdr.vocab_size)
        tok = load_tokenizer(tok_path, vocab_size=hdr.vocab_size if str(tok_path).endswith(".bin") else None)
        return LoadedModel(model, _check_tokenizer(tok, model, spec), "llama", spec, True, hdr.dim, hdr.n_layers)


    model, config, causal = load_hf(spec, device=device, dtype=dtype, device_map=device_map)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        folder = Path(spec).expanduser()
        l2c_tok = folder / "tokenizer.bin"
        if folder.is_dir() and l2c_tok.is_file() and not (folder / "tokenizer_config.json").exists():
            tok = Llama2cTokenizer(l2c_tok)  # written by saeforge.models.llama2c.save_hf
        else:
            tok = HFTokenizer.from_pretrained(str(folder) if folder.exists() else spec)
    tc = text_config(config)
    return LoadedModel(
        model=model,
        tokenizer=_check_tokenizer(tok, model, spec),
        family=config.model_type,
        spec=spec,
        is_causal=causal,
        d_model=int(tc.hidden_size),
        n_layers=int(tc.num_hidden_layers),
    )


def max_positions(loaded: LoadedModel) -> int | None:
    """The longest context the model was built for (its position table / RoPE length), or None if unknown."""
    cfg = getattr(loaded.model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context_len(loaded: LoadedModel, context_len: int, flag: str = "--context-len") -> None:
    """Refuse contexts longer than the model's positions (they would give garbage activations silently)."""
    limit = max_positions(loaded)
    if context_len < 2:
        raise SaeforgeError(f"{flag} {context_len} is too short; a context needs BOS and at least one token")
    if limit is not None and context_len > limit:
        raise SaeforgeError(f"{flag} {context_len} exceeds the {limit} positions of {loaded.spec}; "
                            f"use {flag} {limit} or less")
