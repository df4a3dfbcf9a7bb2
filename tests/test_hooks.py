"""Hook points on tiny random models of each family, saved with save_pretrained and loaded through load_model.

References are the models' own ``output_hidden_states``, the residual-stream identity
resid_post = resid_pre + attn_out + mlp_out, and closed forms for spliced activations.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from saeforge.errors import SaeforgeError
from saeforge.hooks import HookPoint, capture, resolve_hook, splice
from saeforge.models import HFTokenizer, LoadedModel, load_model

WORDS = "the a cat dog sat on mat ran far home big small . ,".split()
TEXT = "the big cat sat on the mat . a small dog ran far home"


def _save_tokenizer(folder: Path, bert: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    if bert:
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(folder)
        return
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)


def _build(family: str):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                                bos_token_id=1, eos_token_id=2))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small, max_position_embeddings=64))
    if family == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(**small, max_position_embeddings=64))
    kv = dict(num_key_value_heads=2, max_position_embeddings=64)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
           "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM)}[family]
    extra = {"head_dim": 8} if family.startswith("gemma") else {}
    return cls[1](cls[0](**small, **kv, **extra))


_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    def get(family: str) -> Path:
        if family not in _CACHE:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(family)
            _build(family).save_pretrained(folder)
            _save_tokenizer(folder, bert=family == "bert")
            _CACHE[family] = folder
        return _CACHE[family]

    return get


# expected module paths, written out by hand per family: (block list, embed, attn_out, mlp_in, mlp_out, final norm)
EXPECTED = {
    "llama": ("model.layers", "model.embed_tokens", "self_attn", "mlp:in", "mlp", "model.norm"),
    "mistral": ("model.layers", "model.embed_tokens", "self_attn", "mlp:in", "mlp", "model.norm"),
    "qwen2": ("model.layers", "model.embed_tokens", "self_attn", "mlp:in", "mlp", "model.norm"),
    "gemma": ("model.layers", "model.embed_tokens", "self_attn", "mlp:in", "mlp", "model.norm"),
    "gemma2": ("model.layers", "model.embed_tokens", "post_attention_layernorm", "mlp:in",
               "post_feedforward_layernorm", "model.norm"),
    "gpt2": ("transformer.h", "transformer.wte", "attn", "mlp:in", "mlp", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "attention", "mlp:in", "mlp", "gpt_neox.final_layer_norm"),
    "bert": ("encoder.layer", "embeddings", "attention.output.dense", "intermediate:in", "output.dense", None),
}


def _hp(path: str, name: str) -> tuple[str, str]:
    return (path[:-3], "input") if path.endswith(":in") else (path, "output")


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_loads_and_hooks_match_hidden_states(folders, family):
    lm = load_model(str(folders(family)))
    assert lm.family == family and lm.is_causal == (family != "bert")
    assert (lm.d_model, lm.n_layers) == (32, 4)
    blocks, embed, attn, mlp_in, mlp_out, final_norm = EXPECTED[family]
    assert resolve_hook(lm, "embed") == HookPoint("embed", embed, "output")
    assert resolve_hook(lm, "resid_pre.2") == HookPoint("resid_pre.2", f"{blocks}.2", "input")
    assert resolve_hook(lm, "resid_post.2") == HookPoint("resid_post.2", f"{blocks}.2", "output")
    for alias, rel in (("attn_out", attn), ("mlp_in", mlp_in), ("mlp_out", mlp_out)):
        module, io = _hp(f"{blocks}.1.{rel}", alias)
        assert resolve_hook(lm, f"{alias}.1") == HookPoint(f"{alias}.1", module, io)

    ids = torch.tensor([lm.tokenizer.encode(TEXT)] * 2)
    names = ["embed"] + [f"{k}.{l}" for l in range(4) for k in ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")]
    acts = capture(lm, [resolve_hook(lm, n) for n in names], ids)
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == 5
    mods = dict(lm.model.named_modules())
    for layer in range(4):
        post = acts[f"resid_post.{layer}"]
        assert post.shape == (2, ids.shape[1], 32)
        if layer < 3 or final_norm is None:
            assert torch.allclose(post, hs[layer + 1], atol=1e-6)
        else:  # some transformers versions put the final norm's output last
            assert torch.allclose(post, hs[4], atol=1e-6) or torch.allclose(mods[final_norm](post), hs[4], atol=1e-5)
        assert torch.allclose(acts[f"resid_pre.{layer}"], hs[layer], atol=1e-6)
        if layer:
            assert torch.equal(acts[f"resid_pre.{layer}"], acts[f"resid_post.{layer - 1}"])
        pre, a, m = acts[f"resid_pre.{layer}"], acts[f"attn_out.{layer}"], acts[f"mlp_out.{layer}"]
        if family == "bert":  # post-LN: LN(x + attn) feeds the MLP, LN(that + mlp) is the block output
            blk = mods[f"{blocks}.{layer}"]
            assert torch.allclose(blk.attention.output.LayerNorm(a + pre), acts[f"mlp_in.{layer}"], atol=1e-5)
            assert torch.allclose(blk.output.LayerNorm(m + acts[f"mlp_in.{layer}"]), post, atol=1e-5)
        else:  # the sublayer outputs are exactly what is added to the residual stream
            assert torch.allclose(pre + a + m, post, atol=1e-5)
    if family in ("llama", "mistral", "qwen2"):  # (Gemma scales by sqrt(d) inside or after embed_tokens by version)
        assert torch.equal(acts["embed"], acts["resid_pre.0"])
    if family == "gpt2":
        wpe = lm.model.transformer.wpe(torch.arange(ids.shape[1]))
        assert torch.allclose(acts["embed"] + wpe, acts["resid_pre.0"], atol=1e-6)


def test_hf_tokenizer_adapter(folders):
    tok = load_model(str(folders("gpt2"))).tokenizer
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the cat")
    assert ids[0] == tok.bos_id == 1 and len(ids) == 3  # BOS prepended even though the tokenizer adds none
    assert tok.encode("the cat", add_bos=False) == ids[1:]
    assert tok.decode(ids) == "the cat"
    assert tok.token_str(ids[1]) == "the" and tok.token_str(1) == "<bos>"
    assert {0, 1, 2, 3} <= tok.special_ids and tok.pad_id == 0 and tok.vocab_size == 4 + len(WORDS)
    bert = load_model(str(folders("bert"))).tokenizer
    ids = bert.encode("the cat")
    assert (ids[0], ids[-1]) == (bert.bos_id, bert.eos_id) == (2, 3)  # [CLS] ... [SEP]
    assert bert.encode("the cat", add_bos=False) == ids[1:-1]


def test_folder_without_tokenizer(tmp_path, folders):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folders("gpt2").iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(SaeforgeError, match="--tokenizer"):
        load_model(str(bare))
    lm = load_model(str(bare), tokenizer=str(folders("gpt2")))
    assert lm.tokenizer.encode("the cat")[0] == 1


def _count_calls(model: nn.Module, paths: list[str]) -> tuple[dict[str, int], list]:
    counts = {p: 0 for p in paths}
    mods = dict(model.named_modules())
    handles = [mods[p].register_forward_hook(lambda *_a, p=p: counts.__setitem__(p, counts[p] + 1)) for p in paths]
    return counts, handles


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_early_skips_later_layers(folders, family):
    lm = load_model(str(folders(family)))
    blocks = EXPECTED[family][0]
    later = [f"{blocks}.2", f"{blocks}.3", "lm_head"]
    counts, handles = _count_calls(lm.model, later)
    ids = torch.tensor([lm.tokenizer.encode(TEXT)])
    hooks = [resolve_hook(lm, "resid_post.1"), resolve_hook(lm, "mlp_in.0"), resolve_hook(lm, "resid_pre.1")]
    try:
        early = capture(lm.model, hooks, ids)
        assert counts == {p: 0 for p in later}
        full = capture(lm.model, hooks, ids, stop_early=False)
        assert counts == {p: 1 for p in later}
    finally:
        for h in handles:
            h.remove()
    assert early.keys() == full.keys() == {"resid_post.1", "mlp_in.0", "resid_pre.1"}
    for k in early:
        assert torch.equal(early[k], full[k])
    # hooks are gone afterwards: a plain forward still works and nothing is aborted
    assert lm.logits(ids).shape == (1, ids.shape[1], 64)


@pytest.fixture(scope="module")
def llama(folders) -> LoadedModel:
    return load_model(str(folders("llama")))


def test_splice_identity_zero_and_add(llama):
    ids = torch.tensor([llama.tokenizer.encode(TEXT)])
    base = llama.logits(ids)
    with splice(llama, resolve_hook(llama, "resid_post.1"), lambda a: a):
        assert torch.equal(llama.logits(ids), base)
    with splice(llama, resolve_hook(llama, "resid_post.1"), torch.zeros_like):
        assert not torch.allclose(llama.logits(ids), base, atol=1e-3)
    assert torch.equal(llama.logits(ids), base)  # removed on exit
    # last block: logits = lm_head(norm(h + v)), computed by hand from the captured h
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    h = capture(llama, [resolve_hook(llama, "resid_post.3")], ids)["resid_post.3"]
    with splice(llama, resolve_hook(llama, "resid_post.3"), lambda a: a + v):
        got = llama.logits(ids)
    m = llama.model
    assert torch.allclose(got, m.lm_head(m.model.norm(h + v)), atol=1e-5)
    with splice(llama, "resid_post.3", torch.zeros_like):  # RMSNorm(0) = 0 and no lm_head bias: logits are 0
        assert torch.equal(llama.logits(ids), torch.zeros_like(base))
    # adding v after block 1 is the same as adding it before block 2
    with splice(llama, resolve_hook(llama, "resid_post.1"), lambda a: a + v):
        after1 = llama.logits(ids)
    with splice(llama, resolve_hook(llama, "resid_pre.2"), lambda a: a + v):
        before2 = llama.logits(ids)
    assert torch.allclose(after1, before2, atol=1e-6) and not torch.allclose(after1, base, atol=1e-3)


def test_splice_inputs_and_tuple_outputs(llama):
    ids = torch.tensor([llama.tokenizer.encode(TEXT)])
    names = ["resid_pre.1", "attn_out.1", "mlp_in.1", "mlp_out.1", "resid_post.1"]
    hooks = [resolve_hook(llama, n) for n in names]
    # zero MLP input: SwiGLU down(silu(0) * 0) = 0, so the block adds only attention
    with splice(llama, resolve_hook(llama, "mlp_in.1"), torch.zeros_like):
        a = capture(llama, hooks, ids)
    assert torch.equal(a["mlp_out.1"], torch.zeros_like(a["mlp_out.1"]))
    assert torch.allclose(a["resid_post.1"], a["resid_pre.1"] + a["attn_out.1"], atol=1e-6)
    # zero attention output (a tuple-returning module): the MLP sees norm(resid_pre)
    with splice(llama, resolve_hook(llama, "attn_out.1"), torch.zeros_like):
        b = capture(llama, hooks, ids)
    ln = llama.model.model.layers[1].post_attention_layernorm
    assert torch.allclose(b["mlp_in.1"], ln(b["resid_pre.1"]), atol=1e-6)
    assert torch.allclose(b["resid_post.1"], b["resid_pre.1"] + b["mlp_out.1"], atol=1e-6)
    with pytest.raises(SaeforgeError, match="shape"):
        with splice(llama, resolve_hook(llama, "resid_post.0"), lambda x: x[..., :3]):
            llama.logits(ids)


def test_resolve_errors(llama):
    with pytest.raises(SaeforgeError, match=r"model\.layers\.1\.mlp"):
        resolve_hook(llama, "model.layers.1.mpl")
    with pytest.raises(SaeforgeError, match="n_layers=4"):
        resolve_hook(llama, "resid_post.4")
    with pytest.raises(SaeforgeError, match="suffix"):
        resolve_hook(llama, "model.layers.1:foo")
    with pytest.raises(SaeforgeError, match="family"):
        resolve_hook(llama.model, "resid_post.1", family="t5")
    assert resolve_hook(llama, "model.layers.1.mlp:input") == HookPoint("model.layers.1.mlp:in", "model.layers.1.mlp", "input")
    assert resolve_hook(llama, "model.layers.1.mlp") == HookPoint("model.layers.1.mlp", "model.layers.1.mlp", "output")
    with pytest.raises(SaeforgeError, match="at least one"):
        capture(llama, [], torch.tensor([[1, 2]]))


# ---- a hand-made model whose blocks return tuples (transformers 4.x style) and take hidden_states by keyword ----
class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states, scale=1.0):
        return (hidden_states + scale * torch.tanh(self.lin(hidden_states)), None)


class _Toy(nn.Module):
    def __init__(self, d: int = 6, n: int = 3):
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.unused = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for blk in self.blocks:
            h = blk(hidden_states=h, scale=0.5)[0]
        return h


def test_tuple_blocks_and_keyword_inputs():
    torch.manual_seed(0)
    toy = _Toy().eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    hooks = [resolve_hook(toy, "blocks.1:in"), resolve_hook(toy, "blocks.1")]
    acts = capture(toy, hooks, ids)
    x = acts["blocks.1:in"]
    assert torch.allclose(acts["blocks.1"], x + 0.5 * torch.tanh(toy.blocks[1].lin(x)))
    with torch.no_grad():
        ref = toy.blocks[0](toy.embed(ids), 0.5)[0]
    assert torch.equal(x, ref)
    with splice(toy, hooks[0], torch.zeros_like):  # keyword input replaced
        got = capture(toy, [hooks[1]], ids)["blocks.1"]
    assert torch.allclose(got, 0.5 * torch.tanh(toy.blocks[1].lin.bias).expand_as(got))
    with splice(toy, hooks[1], lambda a: a * 2):  # first element of a tuple output replaced
        out = toy(ids)
    with torch.no_grad():
        assert torch.allclose(out, toy.blocks[2](hidden_states=2 * acts["blocks.1"], scale=0.5)[0])
    with pytest.raises(SaeforgeError, match="never ran"):
        capture(toy, [resolve_hook(toy, "unused")], ids)
    with pytest.raises(SaeforgeError, match="family"):
        resolve_hook(toy, "resid_post.0")
