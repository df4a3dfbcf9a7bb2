"""Dashboard: the streaming statistics against brute force, logit effects against the model's own modules,
the site files, the CLI and the local server."""
from __future__ import annotations

import json
import math
import urllib.request

import numpy as np
import pytest
import torch

from saeforge.dashboard.build import DashboardConfig, Source, build_dashboard, run_pass, sparse_encoder
from saeforge.dashboard.logits import decoder_neighbors, logit_effects_for_model
from saeforge.dashboard.site import load_explanations, read_payload, shard_path
from saeforge.dashboard.stream import BINS_PER_DECADE, LOG_LO, N_LOG_BINS, Halo, LatentStats, linear_histogram, quantile_edges
from saeforge.errors import SaeforgeError


# ---------------------------------------------------------------------------------------------- synthetic data
def synthetic(n=700, m=12, density=0.15, seed=0, doc_len=(5, 60)):
    """Sparse non-negative activations [n, m] (continuous, so no ties), token ids and documents."""
    g = np.random.default_rng(seed)
    fire = g.random((n, m)) < g.uniform(0.01, density * 2, size=m)
    A = np.where(fire, g.lognormal(0.0, 1.0, (n, m)), 0.0).astype(np.float32)
    A[:, 0] = 0.0  # a dead latent
    A[g.choice(n, 3, replace=False), 1] = np.float32([0.5, 2.0, 7.0])  # a latent firing exactly 3 times
    A[:, 1][A[:, 1] < 0.4] = 0
    lengths, total = [], 0
    while total < n:
        lengths.append(int(g.integers(*doc_len)))
        total += lengths[-1]
    doc = np.repeat(np.arange(len(lengths)), lengths)[:n]
    tok = g.integers(0, 500, n)
    return A, tok, doc


def stream_stats(A, tok, doc, top_k=5, context=3, reservoir=8, step=37, chunks=(50, 1, 90, 7, 300), seed=0):
    """Run ``A`` through Halo + LatentStats in irregular chunks (exercising every boundary case)."""
    At = torch.from_numpy(A)
    stats = LatentStats(A.shape[1], top_k=top_k, context=context, reservoir=reservoir, seed=seed)

    def process(rows, lo, hi):
        a = At[rows["row"]]
        r, lat = (a > 0).nonzero(as_tuple=True)
        stats.update(a.shape[0], r, lat, a[r, lat], lo, hi, rows["tok"], rows["doc"], rows["pos"], rows["row"])

    halo = Halo(context, step, process)
    s, i = 0, 0
    while s < len(A):
        n = chunks[i % len(chunks)]
        sl = slice(s, s + n)
        halo.feed({"x": torch.zeros(len(A[sl]), 1), "tok": torch.from_numpy(tok[sl]),
                   "doc": torch.from_numpy(doc[sl]), "pos": torch.arange(len(A[sl]))})
        s, i = s + n, i + 1
    halo.feed(None, final=True)
    return stats


def brute_window(A, tok, doc, r, lat, W):
    toks, acts = [], []
    for o in range(-W, W + 1):
        j = r + o
        if 0 <= j < len(A) and doc[j] == doc[r]:
            toks.append(int(tok[j]))
            acts.append(float(A[j, lat]))
        else:
            toks.append(-1)
            acts.append(0.0)
    return toks, acts


# ---------------------------------------------------------------------------------------------- streaming state
def test_counts_top_k_and_windows_match_brute_force():
    A, tok, doc = synthetic()
    K, W = 5, 3
    stats = stream_stats(A, tok, doc, top_k=K, context=W)
    assert stats.n_rows == len(A)
    np.testing.assert_array_equal(stats.fires.numpy(), (A > 0).sum(0))
    np.testing.assert_allclose(stats.act_sum.numpy(), A.astype(np.float64).sum(0), rtol=1e-9)
    top = stats.top.sorted()
    for lat in range(A.shape[1]):
        rows = np.nonzero(A[:, lat] > 0)[0]
        want = rows[np.argsort(-A[rows, lat])][:K]
        n = len(want)
        valid = top["key"][lat] > 0
        assert int(valid.sum()) == n
        np.testing.assert_array_equal(top["row"][lat, :n].numpy(), want)
        np.testing.assert_array_equal(top["val"][lat, :n].numpy(), A[want, lat])
        for s, r in enumerate(want):
            toks, acts = brute_window(A, tok, doc, int(r), lat, W)
            assert top["tok"][lat, s].tolist() == toks
            np.testing.assert_array_equal(top["act"][lat, s].numpy(), np.float32(acts))
            assert int(top["doc"][lat, s]) == doc[r]


def test_band_sample_is_a_subset_with_correct_windows():
    A, tok, doc = synthetic(seed=1)
    S, W = 8, 3
    stats = stream_stats(A, tok, doc, reservoir=S, context=W)
    res = stats.res.sorted()
    for lat in range(A.shape[1]):
        firing = set(np.nonzero(A[:, lat] > 0)[0].tolist())
        valid = (res["key"][lat] >= 0).numpy()
        rows = res["row"][lat][valid].tolist()
        assert len(rows) == min(S, len(firing)) == len(set(rows))
        assert set(rows) <= firing
        if len(firing) <= S:
            assert set(rows) == firing  # small latents: the whole population
        for s in np.nonzero(valid)[0]:
            r = int(res["row"][lat, s])
            assert float(res["val"][lat, s]) == A[r, lat]
            toks, acts = brute_window(A, tok, doc, r, lat, W)
            assert res["tok"][lat, s].tolist() == toks
            np.testing.assert_array_equal(res["act"][lat, s].numpy(), np.float32(acts))


def test_band_sample_is_uniform():
    """Each firing row is kept with probability S / F whatever its activation (Efraimidis–Spirakis, equal
    weights). Latents draw independent tags, so 300 latents firing on the same rows are 300 independent trials."""
    g = np.random.default_rng(3)
    n, F, S, trials = 120, 40, 8, 300
    rows = np.sort(g.choice(n, F, replace=False))
    A = np.zeros((n, trials), np.float32)
    A[rows, :] = np.sort(g.lognormal(size=F)).astype(np.float32)[:, None]  # activations increase along `rows`
    tok, doc = np.zeros(n, np.int64), np.zeros(n, np.int64)
    res = stream_stats(A, tok, doc, reservoir=S, context=1, step=16, chunks=(17, 30)).res
    hits = np.zeros(n)
    for lat in range(trials):
        hits[res.row[lat][res.key[lat] >= 0].numpy()] += 1
    freq = hits[rows] / trials
    assert hits.sum() == S * trials
    assert np.all(np.abs(freq - S / F) < 0.1), freq  # 4.3 sigma per row
    assert abs(np.corrcoef(np.arange(F), freq)[0, 1]) < 0.5  # no drift towards large or small values


def test_resume_from_state_dict_is_bit_identical():
    A, tok, doc = synthetic(n=400, seed=2)
    full = stream_stats(A, tok, doc)
    At = torch.from_numpy(A)

    def run(stats, halo_state=None, lo=0, hi=len(A)):
        def process(rows, a_lo, a_hi):
            a = At[rows["row"]]
            r, lat = (a > 0).nonzero(as_tuple=True)
            stats.update(a.shape[0], r, lat, a[r, lat], a_lo, a_hi, rows["tok"], rows["doc"], rows["pos"], rows["row"])
        halo = Halo(3, 37, process)
        if halo_state:
            halo.load_state_dict(halo_state)
        sizes = (50, 1, 90, 7, 300)
        s, i = 0, 0
        while s < len(A):
            n = sizes[i % len(sizes)]
            if lo <= s < hi:
                sl = slice(s, s + n)
                halo.feed({"x": torch.zeros(len(A[sl]), 1), "tok": torch.from_numpy(tok[sl]),
                           "doc": torch.from_numpy(doc[sl]), "pos": torch.arange(len(A[sl]))})
            s, i = s + n, i + 1
        if hi >= len(A):
            halo.feed(None, final=True)
        return halo

    first = LatentStats(A.shape[1], top_k=5, context=3, reservoir=8, seed=0)
    halo = run(first, hi=141)  # stop after three chunks
    sd = {**first.state_dict(), **halo.state_dict()}
    second = LatentStats(A.shape[1], top_k=5, context=3, reservoir=8, seed=0)
    second.load_state_dict(sd)
    run(second, halo_state=sd, lo=141)
    for k, v in full.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k


def test_histogram_quantiles_and_linear_rebinning():
    A, tok, doc = synthetic(n=3000, m=4, density=0.4, seed=4)
    stats = stream_stats(A, tok, doc, step=500, chunks=(1000,))
    for lat in range(1, 4):
        v = A[:, lat][A[:, lat] > 0].astype(np.float64)
        b = np.clip(np.floor((np.log10(v) - LOG_LO) * BINS_PER_DECADE), 0, N_LOG_BINS - 1).astype(int)
        ref = np.bincount(b, minlength=N_LOG_BINS)
        got = stats.hist[lat].numpy()
        assert got.sum() == len(v) and np.abs(got - ref).sum() <= 2  # float32 vs float64 log at bin edges
    hi = stats.top.sorted()["val"][:, 0].clamp_min(0)
    lin = linear_histogram(stats.hist, hi, 20)
    q = quantile_edges(stats.hist, hi, 10)
    for lat in range(1, 4):
        v = A[:, lat][A[:, lat] > 0].astype(np.float64)
        exact, _ = np.histogram(v, bins=20, range=(0, v.max()))
        assert lin[lat].sum().item() == pytest.approx(len(v))
        # each display bin is off by at most the mass of the fine bins (ratio 1.049) straddling its edges
        assert np.abs(lin[lat].numpy() - exact).max() <= 0.08 * exact.max() + 3
        want = np.quantile(v, np.linspace(0, 1, 11))
        np.testing.assert_allclose(q[lat, 1:].numpy(), want[1:], rtol=0.06)
        assert q[lat, -1].item() == pytest.approx(v.max())
    assert lin[0].sum() == 0 and torch.all(q[0] == 0)  # the dead latent


def test_linear_histogram_hand_case():
    """30 counts in the fine bin [1, 1.049) and 10 in [2, 2.1): with max 2.05 and 4 display bins of width
    0.5125, the first group lies in bin 1 ([0.5125, 1.025) gets the part below 1.025) and bin 2, the second in bin 3."""
    hist = torch.zeros(1, N_LOG_BINS, dtype=torch.long)
    b1 = int((0 - LOG_LO) * BINS_PER_DECADE)  # fine bin starting at 10^0 = 1
    b2 = int(np.floor((math.log10(2.0) - LOG_LO) * BINS_PER_DECADE))
    hist[0, b1], hist[0, b2] = 30, 10
    lo1, hi1 = 1.0, 10.0 ** (LOG_LO + (b1 + 1) / BINS_PER_DECADE)
    lo2 = 10 ** (LOG_LO + b2 / BINS_PER_DECADE)
    lin = linear_histogram(hist, torch.tensor([2.05], dtype=torch.float64), 4)[0].numpy()
    w = 2.05 / 4
    in_bin1 = 30 * (2 * w - lo1) / (hi1 - lo1)
    np.testing.assert_allclose(lin, [0, in_bin1, 30 - in_bin1, 10], rtol=1e-9, atol=1e-9)
    assert lo2 < 2.05  # the second group's fine bin is cut at the maximum, so all 10 land below it


def test_sparse_encoder_matches_dense_encode():
    from saeforge.sae import create_sae, make_config

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=8, d_sae=32, k=4))
    x = torch.randn(50, 8)
    r, lat, v = sparse_encoder(sae)(x)
    dense = sae.encode(x)
    rr, ll = (dense > 0).nonzero(as_tuple=True)
    assert torch.equal(r, rr) and torch.equal(lat, ll)
    torch.testing.assert_close(v, dense[rr, ll])
    relu = create_sae(make_config("relu", d_in=8, d_sae=32))
    r2, l2, v2 = sparse_encoder(relu)(x)
    d2 = relu.encode(x)
    rebuilt = torch.zeros_like(d2).index_put_((r2, l2), v2)
    assert torch.equal(rebuilt, d2) and bool((v2 > 0).all())


# ---------------------------------------------------------------------------------------------- logit effects
def _check_effects(model, reference, W_dec, k=5, bins=16):
    """``reference(d)``: the direct logit effect of unit directions ``d`` computed with the model's own final
    norm module and LM head, times the norm's (known, positive) 1/scale factor so it is exactly linear in d."""
    head = model.get_output_embeddings()
    eff = logit_effects_for_model(W_dec, model, k=k, bins=bins)
    assert eff is not None
    d = W_dec / W_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():
        ref = reference(d)
    V = head.weight.shape[0]
    torch.testing.assert_close(eff["top_vals"], ref.topk(k, dim=1).values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eff["bot_vals"], ref.topk(k, dim=1, largest=False).values, rtol=1e-4, atol=1e-5)
    assert torch.equal(eff["top_ids"], ref.topk(k, dim=1).indices)
    assert torch.equal(eff["bot_ids"], ref.topk(k, dim=1, largest=False).indices)
    for i in range(W_dec.shape[0]):
        counts, _ = np.histogram(ref[i].numpy(), bins=bins, range=(ref[i].min().item(), ref[i].max().item()))
        assert eff["hist"][i].sum().item() == V
        assert np.abs(eff["hist"][i].numpy() - counts).sum() <= 2  # values within rounding of a bin edge


def _gain_center(model):
    from saeforge.dashboard.logits import find_final_norm, norm_gain

    return norm_gain(find_final_norm(model), model.get_output_embeddings().weight.shape[1])


def _rms(d):
    return d.pow(2).mean(-1, keepdim=True).sqrt()


def test_logit_effects_llama_rmsnorm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=1e-12, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.2, 2.0)
    norm, head = model.model.norm, model.lm_head
    _check_effects(model, lambda d: head(norm(d) * _rms(d)), torch.randn(6, 16))
    assert _gain_center(model)[1] is False


def test_logit_effects_gpt2_layernorm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, layer_norm_epsilon=1e-12)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.2, 2.0)
        model.transformer.ln_f.bias.normal_()
    ln, head = model.transformer.ln_f, model.lm_head
    std = lambda d: d.var(-1, unbiased=False, keepdim=True).sqrt()  # noqa: E731
    _check_effects(model, lambda d: head((ln(d) - ln.bias) * std(d)), torch.randn(5, 16))
    assert _gain_center(model)[1] is True


def test_logit_effects_gemma_one_plus_weight():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(2)
    cfg = GemmaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-12)
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(-0.5, 1.0)
    norm, head = model.model.norm, model.get_output_embeddings()
    _check_effects(model, lambda d: head(norm(d) * _rms(d)), torch.randn(4, 16))


def test_decoder_neighbors_brute_force():
    torch.manual_seed(0)
    W = torch.randn(70, 9)
    ids, cos = decoder_neighbors(W, n=4, block=16)
    Wn = W / W.norm(dim=1, keepdim=True)
    sim = Wn @ Wn.T
    sim.fill_diagonal_(-2)
    ref = sim.topk(4, dim=1)
    assert torch.equal(ids, ref.indices)
    torch.testing.assert_close(cos, ref.values)


# ---------------------------------------------------------------------------------------------- explanations
def test_load_explanations(tmp_path):
    p = tmp_path / "eval.json"
    p.write_text(json.dumps({"explanations": {"3": {"pattern": "the [cat]", "precision": 0.9, "recall": 0.5,
                                                    "f1": 0.64, "extra": 1}, "7": "dog"}}))
    ex = load_explanations(p)
    assert ex == {3: {"pattern": "the [cat]", "precision": 0.9, "recall": 0.5, "f1": 0.64}, 7: {"pattern": "dog"}}
    p.write_text(json.dumps({"explanations": {"x": {}}}))
    with pytest.raises(SaeforgeError, match="not a latent id"):
        load_explanations(p)
    p.write_text("{")
    with pytest.raises(SaeforgeError, match="not valid JSON"):
        load_explanations(p)
    with pytest.raises(SaeforgeError, match="not found"):
        load_explanations(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- resumable pass
class _Crash(Exception):
    pass


def test_run_pass_resumes_bit_identically(tmp_path):
    from saeforge.sae import create_sae, make_config

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=6, d_sae=24, k=3))
    g = torch.Generator().manual_seed(1)
    chunks = [{"x": torch.randn(n, 6, generator=g), "tok": torch.randint(0, 99, (n,), generator=g),
               "doc": torch.full((n,), i // 2), "pos": torch.arange(n)} for i, n in enumerate((40, 33, 7, 60, 25))]

    def source(crash_at=None):
        def gen(skip):
            for i in range(skip, len(chunks)):
                if i == crash_at:
                    raise _Crash
                yield chunks[i]
        return Source("text", {}, None, gen, None)

    cfg = DashboardConfig(sae="x", data="y", out=str(tmp_path), top_k=4, context=2, reservoir=6, checkpoint_rows=30)
    full = run_pass(cfg, sae, source(), tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    with pytest.raises(_Crash):
        run_pass(cfg, sae, source(crash_at=3), tmp_path / "b", progress=False)
    resumed = run_pass(cfg, sae, source(), tmp_path / "b", progress=False)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    other = DashboardConfig(sae="x", data="y", out=str(tmp_path), top_k=5, context=2, reservoir=6)
    with pytest.raises(SaeforgeError, match="other settings"):
        run_pass(other, sae, source(), tmp_path / "b", progress=False)


# ---------------------------------------------------------------------------------------------- end to end
HOOK = "resid_post.2"


@pytest.fixture(scope="module")
def built(tmp_path_factory, stories_model_path, tinystories_valid):
    """A random TopK SAE on stories260K; a small text; its activation cache; dashboards built from both."""
    from saeforge.activations.cache import HarvestConfig, harvest
    from saeforge.cli import main
    from saeforge.sae import create_sae, make_config

    root = tmp_path_factory.mktemp("dash")
    docs = tinystories_valid.read_text().split("\n\n")[:25]
    text = root / "small.txt"
    text.write_text("\n\n".join(docs))
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=48, k=6, hook=HOOK, model=str(stories_model_path)))
    sae.save(root / "sae")
    expl = root / "eval.json"
    expl.write_text(json.dumps({"explanations": {"5": {"pattern": "zebra [stripes]", "precision": 0.75,
                                                       "recall": 0.5, "f1": 0.6}}}))
    cache = harvest(HarvestConfig(model=str(stories_model_path), data=str(text), hooks=[HOOK], out=str(root / "cache"),
                                  context_len=64, batch_contexts=4, shard_tokens=700), progress=False)
    rc = main(["dashboard", "build", str(root / "sae"), "--data", str(text), "--out", str(root / "from_text"),
               "--context-len", "64", "--batch-contexts", "4", "--top-k", "6", "--context", "4", "--bands", "4", "--per-band", "2",
               "--explanations", str(expl), "--no-progress"])
    assert rc == 0
    cfg = DashboardConfig(sae=str(root / "sae"), data=str(cache), out=str(root / "from_cache"), top_k=6, context=4,
                          n_bands=4, per_band=2, context_len=64, shard_size=5)
    build_dashboard(cfg, progress=False)
    return root, sae


def _encode_cache(path, sae):
    """Brute force: every cache row encoded by the SAE, with its token / document / position."""
    from saeforge.activations.cache import ActivationCache

    cache = ActivationCache(path)
    rows = [cache.shard(i) for i in range(cache.n_shards)]
    assert cache.n_shards > 2
    x = torch.cat([r[f"acts.{HOOK}"] for r in rows]).float()
    with torch.no_grad():
        A = sae.encode(x).numpy()
    return A, *(torch.cat([r[k] for r in rows]).long().numpy() for k in ("token_id", "doc", "pos"))


def _records(site):
    index = read_payload(site / "data" / "index.js")
    size = index["info"]["shard_size"]
    recs = []
    for i in index["id"]:
        shard = read_payload(shard_path(site, i, size))
        recs.append(shard["latents"][i - shard["first"]])
        assert shard["vocab"]
    return index, recs


@pytest.mark.slow  # shares a ~10 s fixture: harvest + two builds on stories260K
def test_site_examples_match_the_activation_cache(built):
    """Every top example and its window, built from text, equals a brute-force recomputation from the
    independently harvested cache (same packing) encoded by the SAE."""
    root, sae = built
    A, tok, doc, pos = _encode_cache(root / "cache", sae)
    where = {(int(d), int(p)): k for k, (d, p) in enumerate(zip(doc, pos))}
    index, recs = _records(root / "from_text")
    assert index["id"] == list(range(48)) and index["info"]["n_tokens"] == len(A)
    np.testing.assert_allclose(index["density"], (A > 0).mean(0), rtol=1e-12)
    for lat, rec in enumerate(recs):
        tol = 1e-3 * rec["max"] + 1e-9  # values are stored to 4 significant digits of the latent's maximum
        want = np.sort(A[:, lat][A[:, lat] > 0])[::-1][:6]
        got = [ex[0] for ex in rec["top"]]
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        for val, d, p, centre, toks, acts in rec["top"]:
            r = where[(d, p)]
            assert toks[centre] == tok[r] and val == pytest.approx(A[r, lat], abs=tol)
            for j, (t, a) in enumerate(zip(toks, acts)):
                rr = r + j - centre
                assert doc[rr] == d and t == tok[rr]
                assert a == pytest.approx(A[rr, lat], abs=tol)
        if rec["fires"]:
            assert sum(rec["hist"]["counts"]) == pytest.approx(rec["fires"], abs=0.05)
            sampled = [ex for b in rec["bands"] for ex in b["examples"]]
            assert 0 < len(sampled) <= 8
            for b in rec["bands"]:
                for ex in b["examples"]:  # every band example lies in its band (edges rounded like the values)
                    assert b["range"][0] - tol <= ex[0] <= b["range"][1] + tol
                    assert ex[0] == pytest.approx(A[where[(ex[1], ex[2])], lat], abs=tol)
        assert len(rec["logits"]["pos"]) == 10 and len(rec["neighbors"]) == 10
    assert recs[5]["explanation"]["pattern"] == "zebra [stripes]" and index["expl"][5] == "zebra [stripes]"


@pytest.mark.slow  # shares a ~10 s fixture: harvest + two builds on stories260K
def test_cache_and_text_builds_agree(built):
    root, _ = built
    ti, tr = _records(root / "from_text")
    ci, cr = _records(root / "from_cache")
    assert ci["info"]["shard_size"] == 5 and len(list((root / "from_cache" / "data" / "shards").glob("*.js"))) == 10
    assert ti["density"] == ci["density"] and ti["max"] == ci["max"]
    for a, b in zip(tr, cr):
        assert a["top"] == b["top"] and a["bands"] == b["bands"] and a["logits"] == b["logits"]


@pytest.mark.slow  # shares a ~10 s fixture: harvest + two builds on stories260K
def test_rebuild_reuses_the_pass_and_site_is_servable(built):
    from saeforge.dashboard.serve import make_server, start_background

    root, _ = built
    site = root / "from_cache"
    state = site / ".build" / "state.safetensors"
    before = state.stat().st_mtime_ns
    cfg = DashboardConfig(sae=str(root / "sae"), data=str(root / "cache"), out=str(site), top_k=6, context=4,
                          n_bands=4, per_band=2, context_len=64, shard_size=5, explanations=str(root / "eval.json"))
    build_dashboard(cfg, progress=False)
    assert state.stat().st_mtime_ns == before  # finished pass: only the site was rewritten
    assert read_payload(site / "data" / "index.js")["expl"][5] == "zebra [stripes]"
    server, url = start_background(site)
    try:
        assert url.startswith("http://127.0.0.1:")
        for path, kind in (("", "text/html"), ("data/index.js", "javascript"), ("style.css", "text/css")):
            with urllib.request.urlopen(url + path, timeout=10) as resp:
                assert resp.status == 200 and kind in resp.headers["Content-Type"]
        body = urllib.request.urlopen(url + "data/shards/00001.js", timeout=10).read().decode()
        assert body.startswith("SAEFORGE.addShard(") and json.loads(body[len("SAEFORGE.addShard("):-3])["first"] == 5
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(SaeforgeError, match="no built dashboard"):
        make_server(root)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sae_lens/jumprelu_skip_transcoder", "sparsify/topk"])
def test_imported_saes_and_transcoders(built, fixtures_dir, case, tmp_path):
    """SAEs written by peer libraries load through saeforge.formats; a transcoder shows its input hook's
    examples (from the cache's resid_post.2) and, its output being 48-wide, no logit panel."""
    from saeforge.formats import load_sae

    root, _ = built
    ckpt = fixtures_dir / case / "checkpoint"
    build_dashboard(DashboardConfig(sae=str(ckpt), data=str(root / "cache"), out=str(tmp_path), hook=HOOK, top_k=3,
                                    context=2, n_bands=2, per_band=1), progress=False)
    sae = load_sae(ckpt)
    A, *_ = _encode_cache(root / "cache", sae)
    index, recs = _records(tmp_path)
    assert index["info"]["transcoder"] == sae.cfg.is_transcoder and index["info"]["hook"] == HOOK
    assert len(recs) == sae.cfg.d_sae == 256
    for lat, rec in enumerate(recs):
        want = np.sort(A[:, lat][A[:, lat] > 0])[::-1][:3]
        np.testing.assert_allclose([ex[0] for ex in rec["top"]], want, rtol=0, atol=1e-3 * rec["max"] + 1e-9)
        assert ("logits" in rec) == (sae.cfg.d_out == 64)


def test_cli_errors(tmp_path, capsys):
    from saeforge.cli import main

    assert main(["dashboard", "serve", str(tmp_path), "--port", "0"]) == 2
    assert "no built dashboard" in capsys.readouterr().err
    assert main(["dashboard", "build", str(tmp_path / "nope"), "--data", "x.txt", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
