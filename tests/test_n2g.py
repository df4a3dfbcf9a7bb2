"""N2G: the pattern trie on hand-made sequences, synthetic latents with known explanations, and a small run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.eval.n2g import WILD, PatternTrie, build_patterns, precision_recall, score_patterns

A, B, C, D, E, PAD, BOS = 5, 6, 7, 8, 9, 2, 1


def test_trie_predictions_on_hand_made_sequences():
    trie = PatternTrie()
    trie.add([A, B], 1.0)  # "A B" fires on B
    trie.add([C, WILD, B], 2.0)  # "C ? B" fires on B
    trie.add([D], 0.5)  # every D
    trie.add([A, B], 0.7)  # duplicate pattern: keeps the larger value
    seq = [BOS, A, B, C, E, B, D, C, A, B, E]
    #  pos:  0   1  2  3  4  5  6  7  8  9  10
    expect = np.zeros(len(seq))
    expect[2] = 1.0  # A B
    expect[5] = 2.0  # C E B
    expect[6] = 0.5  # D
    expect[9] = 2.0  # C A B matches both; the larger value wins
    assert np.array_equal(trie.predict(seq), expect)
    assert trie.match(seq, 4) is None and trie.match(seq, 9) == 2.0
    assert trie.predict([B]).tolist() == [0.0]  # pattern longer than the available context: no match
    assert trie.predict([E, B]).tolist() == [0.0, 0.0]
    assert len(trie) == 3
    text = trie.render(lambda t: f"t{t}")
    assert text.split(" | ")[0] == "[t5] [t6]" and "[t7] * [t6]" in text


def test_trie_rejects_patterns_ending_in_a_wildcard():
    with pytest.raises(SaeforgeError):
        PatternTrie().add([A, WILD], 1.0)


def test_precision_recall_hand_case():
    pred = np.array([1, 1, 0, 0, 1], dtype=bool)
    true = np.array([1, 0, 1, 0, 1], dtype=bool)
    r = precision_recall(pred, true)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    none = precision_recall(np.zeros(3, bool), np.zeros(3, bool))
    assert none["precision"] is None and none["recall"] is None


def _random_contexts(n: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(10, 30, (n, T), generator=g)
    toks[:, 0] = BOS
    return toks


def _plant(toks: torch.Tensor, pattern: list[int], every: int, g: torch.Generator) -> None:
    for c in range(0, toks.shape[0], every):
        t = int(torch.randint(1, toks.shape[1] - len(pattern), (1,), generator=g))
        for i, p in enumerate(pattern):
            if p != WILD:
                toks[c, t + i] = p


def _synthetic_act_fn(tokens: torch.Tensor) -> torch.Tensor:
    """Two synthetic latents: 0 fires 1.0 exactly on B after A; 1 fires 3.0 on E two after C (C ? E)."""
    out = torch.zeros(*tokens.shape, 2)
    out[:, 1:, 0] = ((tokens[:, :-1] == A) & (tokens[:, 1:] == B)).float()
    out[:, 2:, 1] = 3.0 * ((tokens[:, :-2] == C) & (tokens[:, 2:] == E)).float()
    return out


def test_synthetic_latents_are_explained_exactly():
    g = torch.Generator().manual_seed(0)
    train, held = _random_contexts(40, 16, 1), _random_contexts(40, 16, 2)
    for toks in (train, held):
        toks[(toks == A) | (toks == B) | (toks == C) | (toks == E)] = 11  # only the planted ones count
        _plant(toks, [A, B], 2, g)
        _plant(toks, [C, WILD, E], 3, g)
        toks[:, 0] = BOS
    keep_tr, keep_te = train != BOS, held != BOS
    tries = build_patterns(_synthetic_act_fn, train, _synthetic_act_fn(train), keep_tr, bos_id=BOS, pad_id=PAD,
                           n_top=6, n_random=3, max_suffix=6, batch_size=16)
    assert set(tries[0].patterns) == {(A, B)}
    assert set(tries[1].patterns) == {(C, WILD, E)}
    scores = score_patterns(tries, held, _synthetic_act_fn(held), keep_te)
    for s in scores:
        assert s["n_true"] > 5
        assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["f1"] == 1.0


@pytest.fixture(scope="module")
def stories(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


def test_run_n2g_end_to_end(stories, tinystories_valid):
    from saeforge.eval.n2g import run_n2g, sae_act_fn
    from saeforge.sae.base import create_sae, make_config

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=stories.d_model, d_sae=128, k=8, hook="resid_post.1"))
    r = run_n2g(sae, stories, str(tinystories_valid), n_latents=6, n_train_contexts=24, n_heldout_contexts=12,
                context_len=32, n_top=4, n_random=2, max_suffix=8, progress=False)
    s = r["summary"]
    assert s["n_latents"] == 6 and len(r["explanations"]) == 6
    for j, e in r["explanations"].items():
        assert isinstance(e["pattern"], str) and e["pattern"]
        for key in ("precision", "recall", "f1"):
            assert e[key] is None or 0.0 <= e[key] <= 1.0
    assert 0.0 <= s["recall"] <= 1.0 and 0.0 <= s["precision"] <= 1.0
    json.dumps(r)
    # recall is over held-out firings: recompute the number of true firings of one latent independently
    j = int(next(iter(r["latents"])))
    from saeforge.data.packing import pack
    from saeforge.data.text import iter_documents

    ctxs = [c for _, c in zip(range(36), pack(iter_documents(str(tinystories_valid)), stories.tokenizer, 32))][24:]
    toks = torch.stack([c.tokens for c in ctxs])
    keep = torch.stack([c.keep for c in ctxs])
    f = sae_act_fn(sae, stories, "resid_post.1", [j])(toks)[..., 0]
    assert r["latents"][str(j)]["n_true"] == int(((f > 0) & keep).sum())
