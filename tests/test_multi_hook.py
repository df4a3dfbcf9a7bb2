"""Crosscoders (one dictionary over several hooks) and transcoders (input hook -> another target hook) in eval,
dashboard and adapt, against references computed here with plain forward hooks and the SAEs' own math."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saeforge.sae import create_sae, make_config

from test_dashboard import _records  # the site's latent records, shard by shard

CC_HOOKS = ["resid_post.1", "resid_post.3"]  # model.layers.1 / .3 outputs
TC_IN, TC_OUT = "resid_mid.1", "mlp_out.1"  # input of layers.1.post_attention_layernorm -> layers.1.mlp output
N_TOK, CTX, BATCH = 192, 64, 4
D = 64


def crosscoder(d_sae=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = create_sae(make_config("crosscoder", d_in=2 * D, d_sae=d_sae, hooks=CC_HOOKS, hook_scales=[0.7, 0.3]))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(2, D, d_sae, generator=g) * 0.2)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(d_sae, 2, D, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(2, D, generator=g) * 0.1)
    return sae


def identity_crosscoder():
    """Latents (l, i, ±): f = [ReLU(s x), ReLU(-s x)], x̂ = (f₊ − f₋)/s exactly."""
    m = 2 * 2 * D
    sae = create_sae(make_config("crosscoder", d_in=2 * D, d_sae=m, hooks=CC_HOOKS, hook_scales=[0.7, 0.3]))
    eye = torch.eye(2 * D).reshape(2 * D, 2, D)  # latent j = (l, i) -> unit vector at (l, i)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.permute(1, 2, 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def transcoder(d_sae=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    sae = create_sae(make_config("relu", d_in=D, d_sae=d_sae, hook=TC_IN, target_hook=TC_OUT,
                                 apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, d_sae, generator=g) * 0.2)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(d_sae, D, generator=g) * 0.05)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.01)
    return sae


# ---- the SAEs' math, written out -------------------------------------------------------------------------------
def cc_math(sae, xs):
    """xs: [x_1, x_3] each [n, d] -> (codes [n, m], [x̂_1, x̂_3])."""
    s = sae.cfg.hook_scales
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    f = torch.relu(sum((xs[l].double() * s[l]) @ W_enc[l] for l in range(2)) + b_enc)
    return f, [(f @ W_dec[:, l] + b_dec[l]) / s[l] for l in range(2)]


def tc_math(sae, x):
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    f = torch.relu(x.double() @ W_enc + b_enc)
    return f, f @ W_dec + b_dec


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _with_out(o, new):
    return (new, *o[1:]) if isinstance(o, tuple) else new


def layers(model):
    return model.model.layers


def capture_cc(model, tok):
    got = {}
    hs = [layers(model)[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, _out(o).detach()))
          for i in (1, 3)]
    with torch.no_grad():
        logits = model(input_ids=tok).logits
    for h in hs:
        h.remove()
    return [got[1], got[3]], logits


def capture_tc(model, tok):
    got = {}
    h1 = layers(model)[1].post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: got.__setitem__("x", a[0].detach()))
    h2 = layers(model)[1].mlp.register_forward_hook(lambda m, a, o: got.__setitem__("y", _out(o).detach()))
    with torch.no_grad():
        logits = model(input_ids=tok).logits
    h1.remove()
    h2.remove()
    return got["x"], got["y"], logits


def replaced_logits(model, tok, new_by_layer, keep, module=lambda model, i: layers(model)[i]):
    """Logits with module outputs replaced at ``keep`` positions by the given rows, in one forward."""
    def hook(i):
        def fn(m, a, o):
            act = _out(o).clone()
            act[keep] = new_by_layer[i].to(act.dtype)
            return _with_out(o, act)

        return fn

    hs = [module(model, i).register_forward_hook(hook(i)) for i in new_by_layer]
    with torch.no_grad():
        logits = model(input_ids=tok).logits
    for h in hs:
        h.remove()
    return logits


def ce_of(logits, tok, keep):
    m = keep[:, :-1] & keep.new_ones(keep.shape)[:, 1:]
    return F.cross_entropy(logits[:, :-1][m].double(), tok[:, 1:][m], reduction="none")


def fvu(y, y_hat):
    y, y_hat = y.double(), y_hat.double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


@pytest.fixture(scope="module")
def batches(lm, tinystories_valid):
    from saeforge.data.batches import context_batches

    out = list(context_batches(lm.tokenizer, str(tinystories_valid), context_len=CTX, batch_size=BATCH,
                               max_tokens=N_TOK))
    assert all(bool((b.doc >= 0).all()) for b in out)  # no padding: the references need no attention mask
    return out


# ---- eval --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_run(lm, tinystories_valid, tmp_path_factory):
    from saeforge.eval import evaluate_many

    saes = {"cc": crosscoder(), "cc_identity": identity_crosscoder(), "tc": transcoder()}
    out = tmp_path_factory.mktemp("ev")
    res = evaluate_many(saes, lm, str(tinystories_valid), N_TOK, CTX, BATCH, out=out, progress=False,
                        chunk_batches=1)
    return saes, res["saes"], out


def test_crosscoder_eval_per_hook_and_all_hooks_spliced(eval_run, lm, batches):
    saes, res, out = eval_run
    sae, r = saes["cc"], res["cc"]
    xs, ys, f_all, ce_ref, ce_clean = [[], []], [[], []], [], [], []
    for b in batches:
        tok, keep = b.tokens, b.keep
        clean, logits = capture_cc(lm.model, tok)
        f, rec = cc_math(sae, [c[keep] for c in clean])
        for l in range(2):
            xs[l].append(clean[l][keep])
            ys[l].append(rec[l])
        f_all.append(f)
        ce_ref.append(ce_of(replaced_logits(lm.model, tok, {1: rec[0], 3: rec[1]}, keep), tok, keep))
        ce_clean.append(ce_of(logits, tok, keep))
    f = torch.cat(f_all)
    per_hook = r["reconstruction_per_hook"]
    assert list(per_hook) == CC_HOOKS
    for l, h in enumerate(CC_HOOKS):
        x, y = torch.cat(xs[l]), torch.cat(ys[l])
        assert per_hook[h]["fvu"] == pytest.approx(fvu(x, y), rel=1e-4), h
        assert per_hook[h]["mse"] == pytest.approx(float((x.double() - y).pow(2).mean()), rel=1e-4), h
        assert per_hook[h]["l0"] == pytest.approx(float((f > 0).sum(1).double().mean()), rel=1e-6)
    x_all = torch.cat([torch.cat(xs[0]), torch.cat(xs[1])], 1)
    y_all = torch.cat([torch.cat(ys[0]), torch.cat(ys[1])], 1)
    assert r["reconstruction"]["fvu"] == pytest.approx(fvu(x_all, y_all), rel=1e-4)
    assert r["features"]["dead"] == int(((f > 0).sum(0) == 0).sum())
    down = r["downstream"]
    assert down["ce_clean"] == pytest.approx(float(torch.cat(ce_clean).mean()), abs=1e-5)
    assert down["ce_spliced"] == pytest.approx(float(torch.cat(ce_ref).mean()), abs=1e-4)
    assert down["ce_spliced"] > down["ce_clean"] + 1e-3  # the splice really changes the output
    pt = np.load(out / "cc" / "per_token.npz")
    assert np.allclose(pt["ce_spliced"], torch.cat(ce_ref).numpy(), atol=2e-4)
    assert r["sae"]["output_hooks"] == CC_HOOKS
    # zero ablation: both hooks zeroed at once
    zero = [ce_of(replaced_logits(lm.model, b.tokens, {1: 0.0 * torch.zeros(1), 3: 0.0 * torch.zeros(1)},
                                  b.keep), b.tokens, b.keep) for b in batches]
    assert down["ce_zero"] == pytest.approx(float(torch.cat(zero).mean()), abs=1e-4)


def test_identity_crosscoder_gives_clean_ce(eval_run):
    r = eval_run[1]["cc_identity"]
    assert r["reconstruction"]["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert all(v["fvu"] == pytest.approx(0.0, abs=1e-10) for v in r["reconstruction_per_hook"].values())
    assert r["downstream"]["ce_spliced"] == pytest.approx(r["downstream"]["ce_clean"], abs=1e-6)
    assert r["downstream"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_transcoder_eval_against_target_and_spliced_in_one_forward(eval_run, lm, batches):
    saes, res, _ = eval_run
    sae, r = saes["tc"], res["tc"]
    xs, ys, yh, ce_ref = [], [], [], []
    for b in batches:
        tok, keep = b.tokens, b.keep
        x, y, _ = capture_tc(lm.model, tok)
        _, rec = tc_math(sae, x[keep])
        xs.append(x[keep])
        ys.append(y[keep])
        yh.append(rec)
        logits = replaced_logits(lm.model, tok, {1: rec}, keep, module=lambda model, i: layers(model)[i].mlp)
        ce_ref.append(ce_of(logits, tok, keep))
    y, y_hat = torch.cat(ys), torch.cat(yh)
    assert "reconstruction_per_hook" not in r
    assert r["reconstruction"]["fvu"] == pytest.approx(fvu(y, y_hat), rel=1e-4)
    assert r["downstream"]["ce_spliced"] == pytest.approx(float(torch.cat(ce_ref).mean()), abs=1e-4)
    assert r["sae"]["input_hooks"] == [TC_IN] and r["sae"]["output_hooks"] == [TC_OUT]


# ---- dashboard ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dash_cache(tmp_path_factory, stories_model_path, tinystories_valid):
    from saeforge.activations.cache import HarvestConfig, harvest

    root = tmp_path_factory.mktemp("dash")
    text = root / "small.txt"
    text.write_text("\n\n".join(tinystories_valid.read_text().split("\n\n")[:12]))
    cache = harvest(HarvestConfig(model=str(stories_model_path), data=str(text), hooks=CC_HOOKS + [TC_IN],
                                  out=str(root / "cache"), context_len=64, batch_contexts=4, shard_tokens=700),
                    progress=False)
    return root, text, cache


def _cache_rows(path):
    from saeforge.activations.cache import ActivationCache

    cache = ActivationCache(path)
    rows = [cache.shard(i) for i in range(cache.n_shards)]
    return {h: torch.cat([r[f"acts.{h}"] for r in rows]).float() for h in CC_HOOKS + [TC_IN]}


def _check_top(recs, A, k):
    for lat, rec in enumerate(recs):
        want = np.sort(A[:, lat][A[:, lat] > 0])[::-1][:k]
        np.testing.assert_allclose([ex[0] for ex in rec["top"]], want, rtol=0, atol=1e-3 * max(rec["max"], 1e-6) + 1e-6)


def test_dashboard_crosscoder_and_transcoder(dash_cache, stories_model_path, tmp_path):
    from saeforge.dashboard.build import DashboardConfig, build_dashboard
    from saeforge.formats import load_sae

    root, text, cache = dash_cache
    acts = _cache_rows(cache)
    cc, tc = crosscoder(), transcoder()
    cc.cfg.model = tc.cfg.model = str(stories_model_path)
    cc.save(tmp_path / "cc")  # saved folded (decoder norms into the encoder): the site shows the saved codes
    tc.save(tmp_path / "tc")
    cc, tc = (load_sae(tmp_path / n) for n in ("cc", "tc"))
    kw = dict(top_k=4, context=2, n_bands=2, per_band=1, context_len=64, shard_size=7)
    build_dashboard(DashboardConfig(sae=str(tmp_path / "cc"), data=str(cache), out=str(tmp_path / "s_cc"), **kw),
                    progress=False)
    build_dashboard(DashboardConfig(sae=str(tmp_path / "tc"), data=str(cache), out=str(tmp_path / "s_tc"), **kw),
                    progress=False)
    # crosscoder: codes from both hooks; decoder norm per hook on every latent
    index, recs = _records(tmp_path / "s_cc")
    A = cc_math(cc, [acts[h] for h in CC_HOOKS])[0].numpy()
    assert len(recs) == cc.cfg.d_sae and index["info"]["input_hooks"] == CC_HOOKS
    assert index["info"]["output_hooks"] == CC_HOOKS and index["info"]["logit_hook"] == CC_HOOKS[-1]
    _check_top(recs, A, 4)
    norms = cc.W_dec.detach().norm(dim=-1)
    for lat, rec in enumerate(recs):
        assert rec["fires"] == int((A[:, lat] > 0).sum())
        assert rec["decoder_norms"] == {h: pytest.approx(float(norms[lat, l]), abs=1e-4) for l, h in enumerate(CC_HOOKS)}
    # transcoder: the input hook's activations drive the codes; logit effects of the output
    index, recs = _records(tmp_path / "s_tc")
    A = tc_math(tc, acts[TC_IN])[0].numpy()
    assert len(recs) == tc.cfg.d_sae and index["info"]["transcoder"] and index["info"]["input_hooks"] == [TC_IN]
    _check_top(recs, A, 4)
    assert all("decoder_norms" not in r and "logits" in r for r in recs)
    # from text through the model: the same latents as from the cache
    build_dashboard(DashboardConfig(sae=str(tmp_path / "cc"), data=str(text), out=str(tmp_path / "t_cc"),
                                    batch_contexts=4, **kw), progress=False)
    _, from_text = _records(tmp_path / "t_cc")
    _, from_cache = _records(tmp_path / "s_cc")
    for a, b in zip(from_text, from_cache):
        assert a["fires"] == b["fires"]
        np.testing.assert_allclose([e[0] for e in a["top"]], [e[0] for e in b["top"]], atol=1e-4)


# ---- adapt -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["crosscoder", "transcoder"])
def test_adapt_around_crosscoder_and_transcoder(kind, stories_model_path, tinystories_valid, batches, tmp_path):
    from saeforge.adapt import AdaptConfig, build, fit
    from saeforge.adapt.report import adapt_report
    from saeforge.eval.downstream import downstream_batch

    sae = crosscoder() if kind == "crosscoder" else transcoder()
    sae.cfg.model = str(stories_model_path)
    sae.save(tmp_path / "sae")
    cfg = AdaptConfig(model=str(stories_model_path), saes=[str(tmp_path / "sae")], data=str(tinystories_valid),
                      rank=4, tokens=4 * 64 * 4, batch_contexts=4, context_len=64, log_every=1, checkpoint_every=0,
                      device="cpu", lr=3e-3, dropout=0.0)
    ad = build(cfg)
    t = ad.hooks[0]
    assert [hp.name for hp in t.outputs] == (CC_HOOKS if kind == "crosscoder" else [TC_OUT])

    def report():
        return adapt_report(ad.loaded.model, ad.loaded.tokenizer, ad.saes, ad.hooks, str(tinystories_valid),
                            ad.adapter_off, n_tokens=400, context_len=64, progress=False)

    rep0 = report()
    assert rep0["kl_after"] == pytest.approx(rep0["kl_before"], abs=1e-6) and rep0["kl_before"] > 1e-3  # B = 0
    fit(ad, cfg, tmp_path / "run", progress=False)
    rep = report()
    assert rep["kl_after"] < rep["kl_before"]
    assert rep["saes"][0]["hook"] == ",".join(hp.name for hp in t.outputs)
    # the trained model's splice is eval's splice of the adapted model
    model = ad.loaded.model.eval()
    for b in batches[:2]:
        ad.state.keep = b.keep
        with torch.no_grad():
            logits = ad.spliced_logits(b.tokens)
            ref = downstream_batch(ad.loaded, b, [t], {t.key: [torch.zeros(D)] * len(t.outputs)})[0]
            clean = model(input_ids=b.tokens).logits
        np.testing.assert_allclose(ce_of(logits, b.tokens, b.keep).numpy(), ref["ce_spliced"], atol=2e-4)
        np.testing.assert_allclose(ce_of(clean, b.tokens, b.keep).numpy(), ref["ce_clean"], atol=2e-4)
        assert not np.allclose(ref["ce_spliced"], ref["ce_clean"], atol=1e-3)
