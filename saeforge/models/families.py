"""The model families saeforge knows: one :class:`Family` row each, read by the hooks (aliases such as
``resid_post.2``), adapt (default LoRA targets) and the dashboard (the final norm before the unembedding).

Adding a model family is one row of :data:`FAMILIES`, keyed by ``transformers``' ``config.model_type``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class Family:
    """Where a family keeps things. ``blocks``, ``embed`` and ``final_norm`` are relative to the base model
    (the module holding the block list); the sublayer points to a block. A sublayer point is a module path,
    ``:in`` meaning its input."""

    blocks: str  # the block list (an nn.ModuleList)
    embed: str
    attn_out: str
    mlp_out: str
    mlp_in: str
    # the residual stream between the attention and MLP sublayers (TransformerLens hook_resid_mid): the input of
    # the norm that reads it; None where a family has no such point (parallel attention+MLP, post-LN)
    resid_mid: str | None = None
    # adapt's default LoRA targets: attention q, k, v, o and MLP gate/up/down (or their equivalents), as module
    # name suffixes; () where saeforge has none (pass --target-modules)
    lora_targets: tuple[str, ...] = ()
    final_norm: str | None = None  # the norm before the unembedding; None: none (or found by its class name)


_LLAMA = Family("layers", "embed_tokens", "self_attn", "mlp", "mlp:in", "post_attention_layernorm:in",
                final_norm="norm")
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Gemma 2/3 normalise each sublayer's output before adding it to the residual; like TransformerLens'
# hook_attn_out/hook_mlp_out we hook "that which is added to the residual stream".
_GEMMA2 = Family("layers", "embed_tokens", "post_attention_layernorm", "post_feedforward_layernorm", "mlp:in",
                 "pre_feedforward_layernorm:in", final_norm="norm")
# BERT is post-LN: the projections before add & LayerNorm are the sublayer contributions.
_BERT = Family("encoder.layer", "embeddings", "attention.output.dense", "output.dense", "intermediate:in")

FAMILIES: dict[str, Family] = {
    **{f: _LLAMA for f in ("mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "granite", "smollm3",
                           "stablelm", "starcoder2")},
    **{f: replace(_LLAMA, lora_targets=_LLAMA_LORA) for f in ("llama", "mistral", "qwen2", "gemma")},
    # no resid_mid alias where post_attention_layernorm does not read the residual (OLMo 2: post-norm
    # sublayers; Cohere: parallel attention and MLP)
    **{f: replace(_LLAMA, resid_mid=None) for f in ("olmo2", "cohere")},
    "gemma2": replace(_GEMMA2, lora_targets=_LLAMA_LORA),
    **{f: _GEMMA2 for f in ("gemma3", "gemma3_text")},
    "gpt2": Family("h", "wte", "attn", "mlp", "mlp:in", "ln_2:in", lora_targets=("c_attn", "attn.c_proj", "c_fc",
                                                                                  "mlp.c_proj"), final_norm="ln_f"),
    "gpt_neox": Family("layers", "embed_in", "attention", "mlp", "mlp:in",
                       lora_targets=("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
                       final_norm="final_layer_norm"),
    **{f: _BERT for f in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
}


def family_of(model: nn.Module) -> str | None:
    """A ``transformers`` model's family name (``config.model_type``), or None."""
    cfg = getattr(model, "config", None)  # transformers' PretrainedConfig; plain modules have none
    return getattr(cfg, "model_type", None)


def find_blocks(modules: dict[str, nn.Module], rel: str) -> str | None:
    """The full path of the block list ``rel`` among ``modules`` (the shortest match), or None."""
    hits = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and (n == rel or n.endswith("." + rel))]
    return min(hits, key=len) if hits else None


def base_prefix(modules: dict[str, nn.Module], fam: Family) -> str | None:
    """The path of the module holding ``fam``'s block list, with a trailing dot (``""``, ``"model."``), or None
    when the model has no such block list."""
    blocks = find_blocks(modules, fam.blocks)
    return None if blocks is None else blocks[: -len(fam.blocks)]
