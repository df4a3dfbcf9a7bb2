"""saeforge.eval: metrics against direct numpy / model-logit references, exact cases, resume, CLI, report."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saeforge.errors import SaeforgeError
from saeforge.eval import (
    FeatureStats,
    ReconStats,
    decoder_max_cos,
    encode_decode,
    evaluate,
    evaluate_many,
    expand_sources,
    feature_summary,
    format_table,
    latent_quantiles,
    reconstruction_metrics,
)
from saeforge.sae import create_sae, make_config

HOOK = "resid_post.2"
N_TOK, CTX, BATCH = 256, 64, 4


# ---- pure numerics ------------------------------------------------------------------------------------------
def _relu_sae(d_in=16, d_sae=40, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sae = create_sae(make_config("relu", d_in=d_in, d_sae=d_sae, hook=HOOK, apply_b_dec_to_input=True, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, sae.cfg.d_out, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(sae.cfg.d_out, generator=g))
    return sae


def test_recon_metrics_match_numpy_and_streaming_is_exact():
    sae = _relu_sae()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(301, 16)) * rng.uniform(0.5, 3, size=16) + 40.0  # large mean: tests the variance update
    xt = torch.tensor(x, dtype=torch.float32)
    xf = xt.double().numpy()
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    f = np.maximum((xf - b_dec) @ W_enc + b_enc, 0)  # ReLU SAE, b_dec subtracted from the input
    xh = f @ W_dec + b_dec
    err = ((xf - xh) ** 2).sum()
    ref = {
        "fvu": err / ((xf - xf.mean(0)) ** 2).sum(),
        "mse": err / xf.size,
        "cos_sim": np.mean((xf * xh).sum(1) / (np.linalg.norm(xf, axis=1) * np.linalg.norm(xh, axis=1))),
        "rel_norm": np.mean(np.linalg.norm(xh, axis=1) / np.linalg.norm(xf, axis=1)),
        "rel_bias": (xh ** 2).sum() / (xf * xh).sum(),
        "l0": (f > 0).sum(1).mean(),
    }
    one = reconstruction_metrics(sae, xt, batch_rows=10_000)
    for k, v in ref.items():
        assert one[k] == pytest.approx(v, rel=1e-5), k
    assert one["n_tokens"] == 301
    # streaming: uneven batches of the same (y, ŷ, f) give the one-shot sums up to float64 rounding
    f_t, yh_t = encode_decode(sae, xt)
    whole, parts = ReconStats(16), ReconStats(16)
    whole.update(xt, yh_t, f_t)
    cuts = [0, 1, 8, 50, 51, 200, 301]
    for a, b in zip(cuts, cuts[1:]):
        parts.update(xt[a:b], yh_t[a:b], f_t[a:b])
    for k, v in whole.result().items():
        assert parts.result()[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_feature_stats_quantiles_and_decoder_cos():
    rng = np.random.default_rng(2)
    n, d = 500, 6
    f = np.maximum(rng.normal(size=(n, d)), 0) * (rng.uniform(size=(n, d)) < [0.0, 0.01, 0.05, 0.3, 0.9, 0.5])
    stats = FeatureStats(d)
    for s in range(0, n, 37):
        stats.update(torch.tensor(f[s:s + 37], dtype=torch.float32))
    nz_v, nz_i = f[f != 0], np.nonzero(f)[1]
    W = torch.tensor(rng.normal(size=(d, 5)), dtype=torch.float32)
    summ, arr = feature_summary(stats, (nz_v.astype(np.float32), nz_i, n), W, dense_threshold=0.1,
                                quantiles=[0.1, 0.5, 1.0], decoder_chunk=4)
    dens = (f != 0).mean(0)
    assert np.allclose(arr["density"], dens)
    assert summ["dead"] == int((dens == 0).sum()) == 1
    assert summ["dense"] == int((dens > 0.1).sum())
    for j in range(1, d):
        v = f[:, j][f[:, j] != 0]
        assert arr["act_max"][j] == pytest.approx(v.max(), rel=1e-6)
        assert arr["act_mean_nonzero"][j] == pytest.approx(v.mean(), rel=1e-5)
        assert np.allclose(arr["act_quantiles"][j], np.quantile(v.astype(np.float32), [0.1, 0.5, 1.0]), rtol=1e-6)
    assert np.isnan(arr["act_quantiles"][0]).all() and np.isnan(arr["act_max"][0])
    Wn = W.double().numpy()
    Wn /= np.linalg.norm(Wn, axis=1, keepdims=True)
    c = np.abs(Wn @ Wn.T)
    np.fill_diagonal(c, -1)
    best, arg = decoder_max_cos(W, chunk_rows=4)
    assert np.allclose(best, c.max(1), atol=1e-6) and (arg == c.argmax(1)).all()
    assert summ["decoder_cos"]["max"] == pytest.approx(c.max(), abs=1e-6)


def test_latent_quantiles_match_numpy_per_latent():
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 50, size=2000)
    vals = rng.exponential(size=2000)
    q = latent_quantiles(vals, idx, 60, [0.0, 0.25, 0.9])
    for j in range(60):
        v = vals[idx == j]
        assert (np.isnan(q[j]).all() if v.size == 0 else np.allclose(q[j], np.quantile(v, [0.0, 0.25, 0.9])))


def test_expand_sources_reads_sweep_json(tmp_path):
    for n in ("k8", "k16"):
        (tmp_path / "sw" / n).mkdir(parents=True)
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"format": "saeforge-sweep/1", "saes": [{"name": "a", "path": "k8"}, {"path": "k16"}]}))
    (tmp_path / "lone").mkdir()
    got = expand_sources([tmp_path / "sw", tmp_path / "lone", tmp_path / "lone"])
    assert got == [("a", str(tmp_path / "sw" / "k8")), ("k16", str(tmp_path / "sw" / "k16")),
                   ("lone", str(tmp_path / "lone")), ("lone-2", str(tmp_path / "lone"))]


# ---- on the stories260K model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


@pytest.fixture(scope="module")
def batches(lm, tinystories_valid):
    from saeforge.activations.cache import context_batches

    return list(context_batches(lm.tokenizer, str(tinystories_valid), context_len=CTX, batch_size=BATCH,
                                max_tokens=N_TOK))


@pytest.fixture(scope="module")
def acts(lm, batches):
    """Kept-position activations at resid_post.2, captured directly: the independent reference."""
    from saeforge.hooks import capture, resolve_hook

    hp = resolve_hook(lm.model, HOOK, lm.family)
    rows = [capture(lm.model, [hp], tok)[HOOK][keep] for tok, _doc, _pos, keep in batches]
    return torch.cat(rows).double().numpy()


def _hand_sae(d, kind, hook=HOOK, target=None, mean=None):
    """relu SAE with d_sae = 2d: 'identity' (W_enc=[I,-I], W_dec=[I;-I]: exact), 'zero' or 'mean' output."""
    sae = create_sae(make_config("relu", d_in=d, d_sae=2 * d, hook=hook, target_hook=target,
                                 apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) if kind == "identity" else torch.zeros(2 * d, d))
        sae.b_dec.copy_(torch.tensor(mean, dtype=torch.float32) if kind == "mean" else torch.zeros(d))
    return sae


@pytest.fixture(scope="module")
def exact_run(lm, acts, tinystories_valid, tmp_path_factory):
    d = lm.d_model
    saes = {
        "identity": _hand_sae(d, "identity"),
        "zero": _hand_sae(d, "zero"),
        "mean": _hand_sae(d, "mean", mean=acts.mean(0)),
        # transcoders whose input and target are the same tensor (block 1's output = block 2's input)
        "tc_identity": _hand_sae(d, "identity", hook="resid_post.1", target="resid_pre.2"),
        "tc_zero": _hand_sae(d, "zero", hook="resid_post.1", target="resid_pre.2"),
    }
    out = tmp_path_factory.mktemp("exact")
    res = evaluate_many(saes, lm, str(tinystories_valid), N_TOK, CTX, BATCH, out=out, progress=False,
                        report=True, quantiles=[0.0, 0.5, 1.0], chunk_batches=1)
    return res["saes"], out


def test_identity_sae_is_lossless(exact_run, acts):
    r = exact_run[0]["identity"]
    rec, down = r["reconstruction"], r["downstream"]
    assert rec["n_tokens"] == N_TOK == acts.shape[0]
    assert rec["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert rec["cos_sim"] == pytest.approx(1.0, abs=1e-9)
    assert rec["l0"] == pytest.approx((acts != 0).sum(1).mean())
    assert down["ce_spliced"] == down["ce_clean"]
    assert down["kl"] == pytest.approx(0.0, abs=1e-7)
    assert down["ce_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert down["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-9)
    assert down["ce_zero"] > down["ce_mean"] > down["ce_clean"]
    tc = exact_run[0]["tc_identity"]
    assert tc["reconstruction"]["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert tc["downstream"]["ce_spliced"] == down["ce_clean"]


def test_zero_and_mean_saes_equal_the_ablations(exact_run, acts):
    zero, mean = exact_run[0]["zero"], exact_run[0]["mean"]
    assert zero["reconstruction"]["fvu"] == pytest.approx((acts ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum(), rel=1e-9)
    assert zero["reconstruction"]["l0"] == pytest.approx((acts != 0).sum(1).mean())
    assert zero["downstream"]["ce_spliced"] == zero["downstream"]["ce_zero"]
    assert zero["downstream"]["ce_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert mean["reconstruction"]["fvu"] == pytest.approx(1.0, rel=1e-6)
    assert mean["downstream"]["ce_spliced"] == pytest.approx(mean["downstream"]["ce_mean"], abs=1e-4)
    assert mean["downstream"]["ce_recovered_mean"] == pytest.approx(0.0, abs=1e-3)
    tcz = exact_run[0]["tc_zero"]["downstream"]
    assert tcz["ce_spliced"] == tcz["ce_zero"]


def test_ce_clean_and_features_match_direct_computation(exact_run, lm, batches, acts):
    results, out = exact_run
    ces, tgts = [], []
    for tok, _doc, _pos, keep in batches:
        logits = lm.logits(tok)[:, :-1]
        m = keep[:, :-1]
        ces.append(F.cross_entropy(logits[m], tok[:, 1:][m], reduction="none"))
        tgts.append(tok[:, 1:][m])
    ce = torch.cat(ces).double().numpy()
    pt = np.load(out / "identity" / "per_token.npz")
    assert np.allclose(pt["ce_clean"], ce, atol=1e-5) and (pt["target"] == torch.cat(tgts).numpy()).all()
    assert results["identity"]["downstream"]["ce_clean"] == pytest.approx(ce.mean(), abs=1e-6)
    assert results["identity"]["downstream"]["n_tokens"] == ce.size
    # identity SAE codes are [relu(x), relu(-x)]: density and quantiles follow from the raw activations
    feats = np.load(out / "identity" / "features.npz")
    codes = np.concatenate([np.maximum(acts, 0), np.maximum(-acts, 0)], 1)
    assert np.allclose(feats["density"], (codes > 0).mean(0))
    for j in (0, 5, 64 + 7):
        v = codes[:, j][codes[:, j] > 0]
        assert np.allclose(feats["act_quantiles"][j], np.quantile(v.astype(np.float32), [0.0, 0.5, 1.0]), rtol=1e-5)
    assert results["identity"]["features"]["dead"] == int(((codes > 0).sum(0) == 0).sum())


def test_report_and_outputs(exact_run):
    results, out = exact_run
    combined = json.loads((out / "eval.json").read_text())
    assert set(combined["saes"]) == set(results) and len(combined["frontier"]) == 5
    assert json.loads((out / "zero" / "eval.json").read_text())["downstream"]["ce_recovered"] is not None
    md = (out / "report.md").read_text()
    for fig in ("density.png", "ce_recovered.png", "token_losses.png", "frontier.png"):
        assert (out / "figures" / fig).stat().st_size > 1000 and f"figures/{fig}" in md
    assert not (out / "eval_chunks").exists()
    table = format_table(results)
    assert table.splitlines()[0].split()[:3] == ["sae", "l0", "fvu"] and len(table.splitlines()) == 7


def test_resume_gives_the_same_json(lm, tinystories_valid, tmp_path):
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=lm.d_model, d_sae=96, k=6, hook=HOOK))
    kw = dict(n_tokens=160, context_len=32, batch_contexts=2, chunk_batches=1, progress=False)
    full = evaluate(sae, lm, str(tinystories_valid), out=tmp_path / "a", **kw)

    class Stop(Exception):
        pass

    def stopper(phase, at):
        def cb(p, n):
            if p == phase and n == at:
                raise Stop
        return cb

    with pytest.raises(Stop):
        evaluate(sae, lm, str(tinystories_valid), out=tmp_path / "b", on_chunk=stopper("recon", 2), **kw)
    state = json.loads((tmp_path / "b" / "eval_state.json").read_text())["state"]  # beside its sha256
    assert state["recon"]["chunks_done"] == 2 and not state["recon"]["done"]
    with pytest.raises(Stop):
        evaluate(sae, lm, str(tinystories_valid), out=tmp_path / "b", resume=True, on_chunk=stopper("downstream", 1), **kw)
    resumed = evaluate(sae, lm, str(tinystories_valid), out=tmp_path / "b", resume=True, **kw)
    assert resumed == full
    assert (tmp_path / "a" / "eval.json").read_text() == (tmp_path / "b" / "eval.json").read_text()
    assert np.array_equal(np.load(tmp_path / "a" / "per_token.npz")["kl"], np.load(tmp_path / "b" / "per_token.npz")["kl"])
    with pytest.raises(SaeforgeError, match="different evaluation"):
        evaluate(sae, lm, str(tinystories_valid), out=tmp_path / "b", resume=True, **{**kw, "n_tokens": 99})


def test_encoder_skips_downstream_and_bad_inputs(lm, tinystories_valid):
    enc = dataclasses.replace(lm, is_causal=False)
    sae = _hand_sae(lm.d_model, "identity")
    r = evaluate(sae, enc, str(tinystories_valid), n_tokens=64, context_len=32, progress=False)
    assert "encoder" in r["downstream"]["skipped"] and r["reconstruction"]["fvu"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(SaeforgeError, match="widths"):
        evaluate(_hand_sae(8, "identity"), lm, str(tinystories_valid), n_tokens=32, context_len=32, progress=False)
    with pytest.raises(SaeforgeError, match="data"):
        evaluate(sae, lm, None)
    with pytest.raises(SaeforgeError, match="unknown key"):
        evaluate(sae, lm, str(tinystories_valid), dense_treshold=0.2)


def test_cli_prints_table_and_writes_json(stories_model_path, tinystories_valid, tmp_path, capsys, monkeypatch):
    from saeforge.cli import main

    torch.manual_seed(1)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=4, hook=HOOK, model=str(stories_model_path)))
    sae.save(tmp_path / "topk")
    # --all runs the registered optional sections; stand one in so the test does not depend on them
    import saeforge.eval.extras as ev

    fake = ev.Extra(options=lambda cfg: {"n_tokens": cfg.n_tokens},
                    run=lambda ctx: {"summary": {"score": 0.5, "n": ctx.options["n_tokens"]},
                                     "tasks": [{"task": "x", "loss": 0.1}]})
    monkeypatch.setattr(ev, "EXTRAS", {"fake": fake})
    rc = main(["eval", "--sae", str(tmp_path / "topk"), "--data", str(tinystories_valid), "--tokens", "200",
               "--context-len", "64", "--out", str(tmp_path / "ev"), "--all", "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["sae", "l0", "fvu"] and lines[2].split()[0] == "topk"
    assert float(lines[2].split()[1]) == 4.0  # l0 of a TopK SAE with k=4 (random weights: all k positive)
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["reconstruction"]["n_tokens"] == 200 and res["sae"]["source"] == str(tmp_path / "topk")
    assert res["extras"]["fake"]["summary"]["n"] == 200
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "fake (topk)" in md and "| x | 0.1000 |" in md


def test_every_fixture_format_evaluates(fixtures_dir):
    """Codes and reconstructions of every peer-library checkpoint match the library's own outputs."""
    from safetensors.torch import load_file

    from saeforge.formats import load_sae

    cases = json.loads((fixtures_dir / "index.json").read_text())["cases"]
    for case in cases:
        d = fixtures_dir / case["path"]
        sae = load_sae(d / "checkpoint")
        x = load_file(d / "inputs.safetensors")["x"]
        exp = load_file(d / "expected.safetensors")
        f, y_hat = encode_decode(sae, x)
        assert torch.allclose(f, exp["feature_acts"], atol=1e-5), case["path"]
        assert torch.allclose(y_hat, exp["reconstruction"], atol=1e-5), case["path"]
        if not sae.cfg.is_transcoder:
            xr, yr = x.double().numpy(), exp["reconstruction"].double().numpy()
            fvu = ((xr - yr) ** 2).sum() / ((xr - xr.mean(0)) ** 2).sum()
            assert reconstruction_metrics(sae, x)["fvu"] == pytest.approx(fvu, rel=1e-4), case["path"]
