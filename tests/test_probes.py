"""Probe loss: the Newton probe against scikit-learn, the task rules on hand-labelled text, the JSONL reader,
and one small end-to-end run on stories260K."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.eval.probe_tasks import (
    BUILTIN_TASKS,
    read_jsonl_tasks,
    token_char_spans,
    token_labels,
)
from saeforge.eval.probes import best_probe, fit_logistic_1d, logistic_loss

TASKS = {t.name: t for t in BUILTIN_TASKS}


def _sklearn_fit(x: np.ndarray, y: np.ndarray, C: float = np.inf):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(x, y)
    return clf.coef_[0, 0], clf.intercept_[0], log_loss(y, clf.predict_proba(x)[:, 1])


# ---- the 1-D probe ------------------------------------------------------------------------------------------------
def test_newton_probe_matches_sklearn_unregularised():
    rng = np.random.default_rng(0)
    n, m = 600, 8
    scale = rng.uniform(0.05, 30.0, size=m)
    x = rng.normal(size=(n, m)) * scale + rng.normal(size=m) * 5
    signal = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std() + 0.5 * (x[:, 3] - x[:, 3].mean()) / x[:, 3].std()
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(1.2 * signal - 0.4)))).astype(float)
    fit = fit_logistic_1d(torch.tensor(x), torch.tensor(y))
    assert bool(fit.converged.all())
    for j in range(m):
        w, b, loss = _sklearn_fit(x[:, j:j + 1], y)
        assert fit.w[j].item() == pytest.approx(w, abs=1e-4, rel=1e-4)
        assert fit.b[j].item() == pytest.approx(b, abs=1e-4, rel=1e-4)
        assert fit.loss[j].item() == pytest.approx(loss, abs=1e-4)
    # the held-out loss helper is the same cross-entropy
    ll = logistic_loss(torch.tensor(x), torch.tensor(y), fit.w, fit.b)
    assert torch.allclose(ll, fit.loss, atol=1e-10)


def test_ridge_option_matches_sklearn_l2_on_standardised_feature():
    # ridge/2 · w_s² on the mean loss == sklearn's ½w² + C·Σ loss with C = 1 / (ridge · n)
    rng = np.random.default_rng(1)
    n, ridge = 300, 0.05
    x = rng.normal(3.0, 7.0, size=(n, 1))
    y = (x[:, 0] + rng.normal(0, 7.0, size=n) > 3.0).astype(float)
    fit = fit_logistic_1d(torch.tensor(x), torch.tensor(y), ridge=ridge)
    xs = (x - x.mean()) / x.std()
    w_s, b_s, _ = _sklearn_fit(xs, y, C=1.0 / (ridge * n))
    assert fit.w[0].item() * x.std() == pytest.approx(w_s, rel=1e-5)
    assert fit.b[0].item() + fit.w[0].item() * x.mean() == pytest.approx(b_s, rel=1e-5, abs=1e-6)


def test_separable_and_constant_columns_terminate():
    x = torch.tensor([[-2.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [2.0, 1.0]] * 10, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1] * 10, dtype=torch.float64)
    fit = fit_logistic_1d(x, y, max_iter=30)
    assert torch.isfinite(fit.w).all() and torch.isfinite(fit.b).all()
    assert fit.loss[0] < 1e-3  # separable: the loss goes to 0 as |w| grows
    assert fit.w[1] == 0 and fit.loss[1].item() == pytest.approx(np.log(2), abs=1e-12)  # constant: prior only
    reg = fit_logistic_1d(x, y, ridge=1e-2)
    assert bool(reg.converged[0]) and 0 < reg.w[0] < fit.w[0]


def test_best_probe_picks_the_informative_column_across_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g, dtype=torch.float64)
    y = (x[:, 7] + 0.3 * torch.randn(400, generator=g, dtype=torch.float64) > 0).double()
    r = best_probe(x[:300], y[:300], x[300:], y[300:], chunk=3)
    assert r["index"] == 7 and r["heldout_loss"] < 0.4


# ---- task rules -------------------------------------------------------------------------------------------------
SENTENCE = 'Once upon a time, "Tom saw 3 red cats!" The big dog walked home. Was it happy?'


def _marked(task: str, text: str = SENTENCE) -> list[str]:
    return [text[a:b] for a, b in TASKS[task].spans(text)]


def test_builtin_task_rules_on_a_hand_labelled_sentence():
    assert len(BUILTIN_TASKS) >= 24 and len(TASKS) == len(BUILTIN_TASKS)
    assert _marked("inside_quotes") == ["Tom saw 3 red cats!"]
    assert _marked("sentence_start") == ["O", "T", "W"]  # Once / The / Was (not Tom: mid-sentence quote)
    assert _marked("capitalised_mid") == ["T"]  # Tom
    assert SENTENCE[TASKS["capitalised_mid"].spans(SENTENCE)[0][0]:][:3] == "Tom"
    assert _marked("digit") == ["3"]
    assert _marked("comma") == [","]
    assert _marked("sentence_end") == ["!", ".", "?"]
    assert _marked("pronoun") == ["it"]
    assert _marked("past_ed") == ["ed"]  # walk|ed
    assert _marked("plural_s") == ["s"]  # cat|s (not "Was")
    assert _marked("colour") == ["red"]
    assert _marked("animal") == ["cats", "dog"]
    assert _marked("emotion") == ["happy"]
    assert _marked("after_the") == ["b"]  # big
    assert _marked("after_comma") == ["T"]  # first letter of the word after ", "
    assert _marked("article") == ["a", "The"]
    assert _marked("question_sentence") == ["Was it happy?"]
    assert _marked("exclaim_sentence") == ['Once upon a time, "Tom saw 3 red cats!"']


class _WordTokenizer:
    """A stand-in tokenizer: BOS, then one token per word or punctuation mark (its leading space included)."""

    bos_id, eos_id, pad_id, special_ids = 0, None, 0, frozenset({0})

    def __init__(self, text: str):
        import re

        self.pieces = ["<s>"] + re.findall(r"\s*(?:\w+|[^\w\s])", text)

    def encode(self, text, add_bos=True):
        return list(range(len(self.pieces)))

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids if i != 0)

    def token_str(self, i):
        return self.pieces[i]


def test_token_labels_from_character_spans():
    tok = _WordTokenizer(SENTENCE)
    text, spans = token_char_spans(tok, tok.encode(SENTENCE))
    assert text == SENTENCE and spans[0] == (0, 0)
    lab = token_labels(spans, TASKS["inside_quotes"].spans(text), len(text))
    got = [tok.pieces[i].strip() for i in np.flatnonzero(lab)]
    assert got == ["Tom", "saw", "3", "red", "cats", "!"]  # the quote marks themselves are outside
    lab = token_labels(spans, TASKS["plural_s"].spans(text), len(text))
    assert [tok.pieces[i].strip() for i in np.flatnonzero(lab)] == ["cats"]


def test_token_offsets_with_the_llama2c_tokenizer(stories_tokenizer_path):
    from saeforge.models.tokenizer import Llama2cTokenizer

    tok = Llama2cTokenizer(stories_tokenizer_path)
    for s in (SENTENCE, "Café naïve — ok."):  # the second needs byte-fallback pieces
        ids = tok.encode(s)
        text, spans = token_char_spans(tok, ids)
        assert text == s
        assert "".join(text[a:b] for a, b in spans) == s  # spans tile the text in order
    ids = tok.encode(SENTENCE)
    text, spans = token_char_spans(tok, ids)
    lab = token_labels(spans, TASKS["digit"].spans(text), len(text))
    assert [tok.token_str(i).strip() for i, l in zip(ids, lab) if l] == ["3"]


def test_jsonl_task_reader(tmp_path):
    p = tmp_path / "mytasks.jsonl"
    rows = [
        {"task": "name", "text": "Tom met Sue.", "spans": [[0, 3], {"start": 8, "end": 11}]},
        {"text": "no task field", "spans": []},
        {"task": "name", "text": "Bob ran."},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = read_jsonl_tasks(p)
    assert list(tasks) == ["name", "mytasks"]
    assert [e.spans for e in tasks["name"]] == [[(0, 3), (8, 11)], []]
    assert tasks["mytasks"][0].text == "no task field"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "abc", "spans": [[2, 9]]}) + "\n")
    with pytest.raises(SaeforgeError, match="bad.jsonl:1"):
        read_jsonl_tasks(bad)
    with pytest.raises(SaeforgeError, match="does not exist"):
        read_jsonl_tasks(tmp_path / "missing.jsonl")


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


def test_probe_suite_end_to_end(stories, tinystories_valid, tmp_path):
    from saeforge.eval.probes import run_probe_suite
    from saeforge.sae.base import create_sae, make_config

    torch.manual_seed(0)
    d = stories.d_model
    sae = create_sae(make_config("topk", d_in=d, d_sae=2 * d, k=8, hook="resid_post.2"))
    with torch.no_grad():  # the first d latents read the raw dimensions, so the SAE must do >= the baseline
        sae.W_enc[:, :d] = torch.eye(d)
        sae.b_dec.zero_()
        sae.b_enc.zero_()
    jl = tmp_path / "t.jsonl"
    texts = [f"Tom had {i} red balls. Sue had none." for i in range(40)]
    jl.write_text("\n".join(json.dumps({"task": "ball", "text": t, "spans": [[t.index("balls"), t.index("balls") + 5]]})
                            for t in texts))
    # tiny data: a few tasks are separable on the training split, so use the documented ridge option
    r = run_probe_suite(sae, stories, str(tinystories_valid), n_tokens=2500, tasks_jsonl=str(jl), max_per_class=150,
                        min_positives=10, ridge=1e-2, progress=False)
    s = r["summary"]
    names = [row["task"] for row in r["tasks"]]
    assert names[: len(BUILTIN_TASKS)] == [t.name for t in BUILTIN_TASKS] and names[-1] == "ball"
    assert s["n_tasks"] + s["n_skipped"] == len(BUILTIN_TASKS) + 1 and s["n_tasks"] >= 15
    assert s["n_tokens"] >= 2500
    used = [row for row in r["tasks"] if "skipped" not in row]
    for row in used:
        assert row["sae"]["train_loss"] <= row["baseline"]["train_loss"] + 1e-9
        assert row["prior_loss"] == pytest.approx(np.log(2))  # balanced classes
    assert s["probe_loss"] < s["prior_loss"] and s["baseline_probe_loss"] < s["prior_loss"]
    json.dumps(r)  # JSON-able


def test_bad_options_raise_one_line_errors():
    from saeforge.eval.probes import run_probe_suite
    from saeforge.sae.base import create_sae, make_config

    no_hook = create_sae(make_config("topk", d_in=8, d_sae=16, k=2))
    with pytest.raises(SaeforgeError, match="names no hook"):
        run_probe_suite(no_hook, None, ["text"])
    sae = create_sae(make_config("topk", d_in=8, d_sae=16, k=2, hook="resid_post.0"))
    with pytest.raises(SaeforgeError, match="select_on"):
        run_probe_suite(sae, None, ["text"], select_on="best")
    with pytest.raises(SaeforgeError, match="no probe tasks"):
        run_probe_suite(sae, None, ["text"], builtin_tasks=False)
