"""An SAE saeforge exports to SAELens format, spliced by SAELens's own ``HookedSAETransformer``, changes a model's
logits exactly as saeforge's own splice does.

The model is a tiny random GPT-2 built locally (no download): a Hugging Face ``GPT2LMHeadModel`` for saeforge,
and the same weights converted by TransformerLens's own ``convert_gpt2_weights`` into a ``HookedSAETransformer``
for SAELens. The two unspliced models agree to float rounding (checked first), so any difference in the
spliced logits would come from the exported file: hook name, orientation, ``b_dec`` convention, thresholds,
normalisation. Skips when sae_lens / transformer_lens are not importable (they live in the peers venv only).
"""
from __future__ import annotations

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")

from saeforge.adapt.splice import SpliceState, resolve_sae_hooks, spliced  # noqa: E402
from saeforge.formats import save_sae_as  # noqa: E402
from saeforge.sae import create_sae, make_config  # noqa: E402

D, LAYERS, HEADS, VOCAB, CTX = 64, 2, 4, 97, 32


@pytest.fixture(scope="module")
def models():
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    tl_cfg = HookedTransformerConfig(n_layers=LAYERS, d_model=D, n_ctx=CTX, d_head=D // HEADS, n_heads=HEADS,
                                     d_mlp=4 * D, d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN",
                                     positional_embedding_type="standard", default_prepend_bos=False)
    tl = sae_lens.HookedSAETransformer(tl_cfg)
    missing, unexpected = tl.load_state_dict(convert_gpt2_weights(hf, tl_cfg), strict=False)
    # GPT-2's LM head has no bias (TL's is zeros); the attention masks are buffers TL builds itself
    assert not unexpected and all(m == "unembed.b_U" or m.endswith((".mask", ".IGNORE")) for m in missing)
    tl.eval()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean_hf, clean_tl = hf(ids).logits, tl(ids)
    assert (clean_hf - clean_tl).abs().max() < 1e-5  # the same model in both libraries
    return hf, tl, ids, clean_hf


def _random_sae(arch: str, hook: str, **kw):
    sae = create_sae(make_config(arch, d_in=D, d_sae=4 * D, hook=hook, model="tiny-gpt2", **kw))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.12))
        sae.W_dec.mul_(torch.rand(4 * D, 1, generator=g) * 1.5 + 0.5)  # non-unit decoder norms
        if arch == "jumprelu":
            sae.log_threshold.copy_((torch.rand(4 * D, generator=g) * 0.3 + 0.05).log())
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


CASES = [  # (arch, saeforge hook, config kwargs)
    ("relu", "resid_post.0", {"apply_b_dec_to_input": True}),
    ("relu", "resid_pre.1", {"input_norm": "layer_norm"}),
    ("topk", "mlp_out.0", {"k": 8}),
    ("jumprelu", "attn_out.1", {}),
    ("jumprelu", "resid_post.0", {"apply_b_dec_to_input": True, "input_scale": 1.7, "output_scale": 1.7}),
    ("relu", "resid_mid.0", {}),
    ("gated", "resid_post.1", {}),
    ("batchtopk", "mlp_out.1", {"k": 8}),
    ("topk", "blocks.0.hook_resid_post", {"k": 12}),  # a TransformerLens name in saeforge's cfg works too
]


@pytest.mark.parametrize("arch,hook,kw", CASES, ids=[f"{a}-{h}" for a, h, _ in CASES])
def test_saelens_splice_matches_saeforge_splice(models, arch, hook, kw, tmp_path):
    hf, tl, ids, clean = models
    sae = _random_sae(arch, hook, **kw)
    with torch.no_grad(), spliced(hf, [sae], resolve_sae_hooks(hf, [sae], None), SpliceState()):
        ours = hf(ids).logits

    out = save_sae_as(sae, tmp_path / "sl", "saelens")
    sl_sae = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert tl.hook_dict.get(sl_sae.cfg.metadata.hook_name) is not None  # a real TL hook, not a skipped one
    with torch.no_grad():
        theirs = tl.run_with_saes(ids, saes=[sl_sae])
        tl.add_sae(sl_sae)  # the persistent attach gives the same logits
        attached = tl(ids)
        tl.reset_saes()

    assert (ours - clean).abs().max() > 1e-2  # the splice really changes the model
    scale = max(1.0, clean.abs().max().item())
    assert (ours - theirs).abs().max().item() < 1e-4 * scale
    assert torch.equal(theirs, attached)
