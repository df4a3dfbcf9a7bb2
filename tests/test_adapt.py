"""LoRA adaptation around frozen SAEs (issue 5): identity at init, the KL objective, save/load, several SAEs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from saeforge.adapt import AdaptConfig, build, fit, load, save
from saeforge.adapt.objective import next_token_ce, next_token_kl
from saeforge.adapt.report import adapt_report
from saeforge.adapt.lora import capped_rank
from saeforge.sae import create_sae, make_config


def test_kl_objective_by_hand():
    # two positions, vocab 2; KL(p||q) = Σ p log(p/q)
    p = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # softmax -> [1/4, 3/4], [1/2, 1/2]
    q = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # softmax -> [1/2, 1/2], [3/4, 1/4]
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert next_token_kl(p, q).item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    assert next_token_kl(p, q, torch.tensor([[True, False]])).item() == pytest.approx(kl0, rel=1e-6)
    assert next_token_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_next_token_ce_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    tokens = torch.tensor([[0, 1, 2]])
    keep = torch.tensor([[False, True, True]])
    ce, m = next_token_ce(logits, tokens, keep)
    assert torch.allclose(ce, torch.tensor([[-math.log(0.25), -math.log(0.1)]]), atol=1e-6)
    assert m.tolist() == [[True, True]]


def test_rank_cap():
    assert capped_rank(64, (64, 32)) == 16 and capped_rank(4, (64, 172)) == 4 and capped_rank(64, (1, 8)) == 1


def _sae(tmp_path, hook, seed, name):
    torch.manual_seed(seed)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook=hook))
    with torch.no_grad():
        sae.b_enc.add_(0.1)
    return str(sae.save(tmp_path / name))


@pytest.fixture(scope="module")
def two_saes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saes")
    return [_sae(tmp, "resid_post.1", 0, "a"), _sae(tmp, "resid_post.3", 1, "b")]


def _cfg(stories_model_path, valid, saes, **kw):
    return AdaptConfig(model=str(stories_model_path), saes=saes, data=str(valid), rank=4, tokens=4 * 64 * 3,
                       batch_contexts=4, context_len=64, log_every=1, checkpoint_every=2, device="cpu", **kw)


def test_adapter_at_init_equals_spliced_model(stories_model_path, tinystories_valid, two_saes):
    ad = build(_cfg(stories_model_path, tinystories_valid, two_saes[:1]))
    model = ad.loaded.model.eval()
    ids = torch.tensor([ad.loaded.tokenizer.encode("Once upon a time, there was a cat.")])
    ad.state.keep = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        with ad.spliced():
            with_lora = model(input_ids=ids).logits
            with ad.adapter_off():
                without = model(input_ids=ids).logits
        clean = model(input_ids=ids).logits
    assert torch.equal(with_lora, without)
    assert not torch.allclose(with_lora, clean, atol=1e-3)  # the splice really changes the output


def test_training_lowers_kl_and_save_load_reproduces_report(stories_model_path, tinystories_valid, two_saes,
                                                            tmp_path):
    cfg = _cfg(stories_model_path, tinystories_valid, two_saes, lr=3e-3)
    ad = build(cfg)
    assert len(ad.hooks) == 2  # several SAEs at once
    rep0 = adapt_report(ad.loaded.model, ad.loaded.tokenizer, ad.saes, ad.hooks, str(tinystories_valid),
                        ad.adapter_off, n_tokens=600, context_len=64, progress=False)
    assert rep0["ce_sae_lora"] == pytest.approx(rep0["ce_sae"], abs=1e-6)  # B = 0
    assert rep0["ce_sae"] > rep0["ce_base"]
    records = fit(ad, cfg, tmp_path / "run", progress=False)
    assert len(records) == 3 and (tmp_path / "run" / "metrics.jsonl").exists()
    rep = adapt_report(ad.loaded.model, ad.loaded.tokenizer, ad.saes, ad.hooks, str(tinystories_valid),
                       ad.adapter_off, n_tokens=600, context_len=64, progress=False)
    assert rep["kl_after"] < rep["kl_before"]
    assert rep["ce_base"] == pytest.approx(rep0["ce_base"], abs=1e-6)
    assert len(rep["saes"]) == 2 and all(s["l0"] <= 8 for s in rep["saes"])
    save(ad, cfg, tmp_path / "run", rep)
    manifest = json.loads((tmp_path / "run" / "adapt.json").read_text())
    assert manifest["adapter"] == "adapter" and (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    back = load(tmp_path / "run", device="cpu")
    rep2 = adapt_report(back.loaded.model, back.loaded.tokenizer, back.saes, back.hooks, str(tinystories_valid),
                        back.adapter_off, n_tokens=600, context_len=64, progress=False)
    for k in ("ce_base", "ce_sae", "ce_sae_lora", "ce_lora_only", "kl_before", "kl_after"):
        assert rep2[k] == pytest.approx(rep[k], rel=1e-5, abs=1e-6), k


def test_resume_matches_uninterrupted(stories_model_path, tinystories_valid, two_saes, tmp_path):
    cfg = _cfg(stories_model_path, tinystories_valid, two_saes[:1], lr=3e-3, dropout=0.0)
    ad = build(cfg)
    fit(ad, cfg, tmp_path / "full", progress=False)
    full = {n: p.detach().clone() for n, p in ad.loaded.model.named_parameters() if "lora" in n}
    short = cfg.replace(tokens=4 * 64 * 2)  # stops at the step-2 checkpoint
    ad2 = build(short)
    fit(ad2, short, tmp_path / "part", progress=False)
    ad3 = build(cfg)
    fit(ad3, cfg, tmp_path / "part", resume=True, progress=False)
    for n, p in ad3.loaded.model.named_parameters():
        if "lora" in n:
            assert torch.allclose(p, full[n], atol=1e-6), n


def test_end_to_end_sae_baseline_trains_sae_params(stories_model_path, tinystories_valid, two_saes, tmp_path):
    cfg = _cfg(stories_model_path, tinystories_valid, two_saes[:1], trainable="sae", lr=1e-3)
    ad = build(cfg)
    before = ad.saes[0].W_enc.detach().clone()
    fit(ad, cfg, tmp_path / "e2e", progress=False)
    assert ad.peft_model is None and not torch.equal(before, ad.saes[0].W_enc)
    assert all(not p.requires_grad for p in ad.loaded.model.parameters())


def test_adapt_lr_schedules_closed_form():
    import math

    from saeforge.train.schedule import schedule_factor

    assert [schedule_factor("constant", s, 10, 0.05) for s in range(10)] == [1.0] * 10
    # 20 steps, 10% warm-up = 2 steps: 0.5, 1.0, then decay over the remaining 18 steps
    lin = [schedule_factor("linear", s, 20, 0.1) for s in range(20)]
    assert lin[:2] == [0.5, 1.0]
    assert [round(v, 6) for v in lin[2:]] == [round(1 - i / 18, 6) for i in range(18)]
    cos = [schedule_factor("cosine", s, 20, 0.1) for s in range(20)]
    assert [round(v, 6) for v in cos[2:]] == [round(0.5 * (1 + math.cos(math.pi * i / 18)), 6) for i in range(18)]
    assert cos[-1] > 0 and lin[-1] > 0  # the last step still moves
