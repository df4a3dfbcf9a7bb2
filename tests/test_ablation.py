"""Ablation sparsity: closed forms of the statistic, and one end-to-end run checked against an independent
re-implementation with a plain PyTorch forward hook."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saeforge.eval.ablation import ablation_sparsity, vocab_median


def _reference(delta: np.ndarray, subtract_median: bool = True) -> float:
    d = delta - np.median(delta, axis=-1, keepdims=True) if subtract_median else delta
    v = d.ravel()
    return (np.abs(v).sum() / np.sqrt((v * v).sum())) ** 2 / v.size


def test_closed_forms():
    T, V = 4, 7
    one = torch.zeros(T, V)
    one[2, 3] = -3.0
    assert ablation_sparsity(one).item() == pytest.approx(1 / (V * T))
    alt = torch.tensor([[1.0, -1.0] * 4] * T)  # V = 8: median 0, every entry moves by 1
    assert ablation_sparsity(alt).item() == pytest.approx(1.0)
    flat = torch.full((T, V), 0.7)
    assert ablation_sparsity(flat, subtract_median=False).item() == pytest.approx(1.0)
    assert math.isnan(ablation_sparsity(flat).item())  # a pure logit shift is no effect at all
    k = torch.zeros(T, V)
    k[0, :3] = 2.0  # 3 of T·V equal entries (fewer than half a row, so the median stays 0)
    assert ablation_sparsity(k).item() == pytest.approx(3 / (V * T))


def test_shift_invariance_and_numpy_reference():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 4, 33, generator=g).pow(3)  # batch of 5 blocks, T=4, V=33
    got = ablation_sparsity(delta)
    assert got.shape == (5,)
    for i in range(5):
        assert got[i].item() == pytest.approx(_reference(delta[i].numpy().astype(np.float64)), rel=1e-9)
    shifted = delta + torch.randn(5, 4, 1, generator=g) * 10  # per-position constant shifts change nothing
    assert torch.allclose(ablation_sparsity(shifted), got, rtol=1e-5)
    even = torch.randn(3, 10, generator=g)
    assert np.allclose(vocab_median(even).numpy(), np.median(even.numpy(), axis=-1))


@pytest.fixture(scope="module")
def stories(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


def test_run_matches_an_independent_forward_hook(stories, tinystories_valid):
    from saeforge.data.packing import pack
    from saeforge.data.text import iter_documents
    from saeforge.eval.ablation import run_ablation_sparsity
    from saeforge.sae.base import create_sae, make_config

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=stories.d_model, d_sae=96, k=6, hook="resid_post.2"))
    T = 3
    r = run_ablation_sparsity(sae, stories, str(tinystories_valid), n_positions=1, T=T, context_len=24,
                              max_batch=4, progress=False)
    s = r["summary"]
    assert s["n_ablations"] == 6 and s["V"] == stories.tokenizer.vocab_size and s["T"] == T
    assert 0 < s["ablation_sparsity"] <= 1
    json.dumps(r)

    # independent recomputation: raw hook on the decoder layer, contribution f_j · W_dec[j], numpy median
    (c, t), = r["positions"]
    ctx = next(x for i, x in enumerate(pack(iter_documents(str(tinystories_valid)), stories.tokenizer, 24)) if i == c)
    ids = ctx.tokens[: t + T][None]
    layer = stories.model.model.layers[2]
    store = {}

    def grab(_m, _a, out):
        store["x"] = (out[0] if isinstance(out, tuple) else out)[0, t].clone()

    h = layer.register_forward_hook(grab)
    with torch.no_grad():
        clean = stories.model(input_ids=ids).logits[0].double().numpy()
    h.remove()
    with torch.no_grad():
        f = sae.encode(store["x"][None])[0]
    active = f.nonzero().flatten().tolist()
    assert sorted(int(j) for j in r["per_latent"]) == sorted(active)
    for j in active:
        contrib = f[j] * sae.W_dec[j].detach()

        def ablate(_m, _a, out, contrib=contrib):
            hs = out[0] if isinstance(out, tuple) else out
            hs = hs.clone()
            hs[:, t] -= contrib
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        h = layer.register_forward_hook(ablate)
        with torch.no_grad():
            abl = stories.model(input_ids=ids).logits[0].double().numpy()
        h.remove()
        want = _reference(abl[t:t + T] - clean[t:t + T])
        assert r["per_latent"][str(j)]["mean"] == pytest.approx(want, rel=1e-4)


def test_bad_options_raise():
    from saeforge.errors import SaeforgeError
    from saeforge.eval.ablation import run_ablation_sparsity

    with pytest.raises(SaeforgeError, match="baseline"):
        run_ablation_sparsity(None, None, [], baseline="zero")
    with pytest.raises(SaeforgeError, match="T=0"):
        run_ablation_sparsity(None, None, [], T=0)
    with pytest.raises(SaeforgeError):
        ablation_sparsity(torch.zeros(5))
