"""One hook-name table: TransformerLens names <-> saeforge aliases, on import, export, resolve and --hook."""
from __future__ import annotations

import json

import pytest

from saeforge.errors import SaeforgeError
from saeforge.hooknames import to_saeforge, to_transformerlens

TABLE = [("hook_embed", "embed"), ("blocks.0.hook_resid_pre", "resid_pre.0"),
         ("blocks.3.hook_resid_post", "resid_post.3"), ("blocks.11.hook_attn_out", "attn_out.11"),
         ("blocks.2.hook_mlp_out", "mlp_out.2"), ("blocks.2.hook_mlp_in", "mlp_in.2"),
         ("blocks.4.hook_resid_mid", "resid_mid.4")]


@pytest.mark.parametrize("tl,sf", TABLE)
def test_table_both_ways(tl, sf):
    assert to_saeforge(tl) == sf and to_transformerlens(sf) == tl
    assert to_saeforge(sf) == sf and to_transformerlens(tl) == tl  # already in the target naming: unchanged


def test_other_names_pass_unchanged():
    for n in ("model.layers.2.mlp", "model.layers.2.mlp:in", "layers.1", None, "blocks.2.attn.hook_z"):
        assert to_saeforge(n) == n and to_transformerlens(n) == n


def test_saelens_import_gives_aliases_and_export_gives_transformerlens_names(fixtures_dir, tmp_path):
    from saeforge.formats import load_sae, save_sae_as

    src = fixtures_dir / "sae_lens/topk/checkpoint"
    original = json.loads((src / "cfg.json").read_text())
    tl = original.get("metadata", {}).get("hook_name") or original.get("hook_name")
    assert tl.startswith("blocks.")
    sae = load_sae(src)
    assert sae.cfg.hook == to_saeforge(tl)
    save_sae_as(sae, tmp_path / "out", "saelens")
    written = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (written.get("metadata", {}).get("hook_name") or written.get("hook_name")) == tl


def test_resolve_hook_accepts_transformerlens_names(stories_model_path):
    from saeforge.hooks import resolve_hook
    from saeforge.models import load_model

    m = load_model(str(stories_model_path)).model
    a, b = resolve_hook(m, "resid_post.2"), resolve_hook(m, "blocks.2.hook_resid_post")
    assert (a.module, a.io) == (b.module, b.io) and b.name == "blocks.2.hook_resid_post"


def test_resid_mid_is_resid_pre_plus_attn_out(stories_model_path):
    """Closed form on a llama-style model: the residual between the sublayers = block input + attention output,
    and resid_post = resid_mid + mlp_out."""
    import torch

    from saeforge.hooks import capture, resolve_hook
    from saeforge.models import load_model

    m = load_model(str(stories_model_path)).model
    names = ["resid_pre.1", "attn_out.1", "blocks.1.hook_resid_mid", "mlp_out.1", "resid_post.1"]
    acts = capture(m, [resolve_hook(m, n) for n in names], torch.randint(3, 500, (2, 16)))
    mid = acts["blocks.1.hook_resid_mid"]
    assert torch.allclose(mid, acts["resid_pre.1"] + acts["attn_out.1"], atol=1e-5)
    assert torch.allclose(acts["resid_post.1"], mid + acts["mlp_out.1"], atol=1e-5)


def test_resid_mid_is_refused_where_a_family_has_none():
    from torch import nn

    from saeforge.hooks import resolve_hook

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp, self.post_attention_layernorm = nn.Linear(4, 4), nn.Linear(4, 4), nn.Identity()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.layers = nn.Embedding(8, 4), nn.ModuleList([Block()])

    with pytest.raises(SaeforgeError, match="no residual stream between attention and MLP"):
        resolve_hook(Model(), "resid_mid.0", family="olmo2")
    assert resolve_hook(Model(), "resid_mid.0", family="llama").module == "layers.0.post_attention_layernorm"


def test_eval_hook_flag_moves_an_imported_sae(fixtures_dir, stories_model_path, tinystories_valid, tmp_path, capsys):
    from saeforge.cli import main

    rc = main(["eval", "--sae", str(fixtures_dir / "sae_lens/topk/checkpoint"), "--model", str(stories_model_path),
               "--data", str(tinystories_valid), "--tokens", "300", "--context-len", "32", "--no-progress",
               "--no-downstream", "--hook", "blocks.2.hook_resid_post", "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert "blocks.2.hook_resid_post" in json.dumps(res), list(res)
    assert "fvu" in json.dumps(res)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_splicing_resid_mid_replaces_the_residual_stream(family, stories_model_path):
    """Replacing resid_mid changes the residual the MLP output is added to, not only the MLP's input (as
    replacing TransformerLens hook_resid_mid does): adding v there = adding v to the attention output."""
    import torch
    import transformers

    from saeforge.hooks import splice
    from saeforge.models import load_model

    if family == "llama":
        m = load_model(str(stories_model_path)).model
    else:
        torch.manual_seed(0)
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2,
                                                                 n_head=4)).eval()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    d = m.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = m(input_ids=ids).logits
        with splice(m, "resid_mid.0", lambda a: a + v):
            mid = m(input_ids=ids).logits
        with splice(m, "attn_out.0", lambda a: a + v):
            attn = m(input_ids=ids).logits
    assert (mid - clean).abs().max() > 1e-3
    assert torch.allclose(mid, attn, atol=1e-5)
