"""``--device-map`` for eval and adapt (issue #15 item 5): the option reaches ``load_model``, llama2.c checkpoints
and torchrun refuse it with one line, and on CPU the real accelerate path (``device_map="cpu"``) gives the
single-device numbers. The multi-GPU comparisons (``device_map="auto"`` over 2 GPUs) are in tests/test_cuda.py."""
from __future__ import annotations

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.sae import create_sae, make_config


class _Reached(Exception):
    pass


def _sae(folder, model, hook="resid_post.2"):
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook=hook, model=str(model)))
    with torch.no_grad():
        sae.b_enc.add_(0.1)
    return str(sae.save(folder))


@pytest.fixture(scope="module")
def hf_stories(tmp_path_factory, stories_model_path):
    """stories260K as a Hugging Face folder (a model accelerate can place)."""
    from saeforge.models import load_model
    from saeforge.models.llama2c import save_hf

    return save_hf(load_model(str(stories_model_path)), tmp_path_factory.mktemp("hf") / "hf")


def test_eval_and_adapt_flags_reach_load_model(monkeypatch, tmp_path, stories_model_path, tinystories_valid):
    from saeforge.adapt import AdaptConfig, build
    from saeforge.adapt import trainer as adapt_trainer
    from saeforge.cli import build_parser
    from saeforge.eval import sources
    from saeforge.eval.api import evaluate_many

    seen = []

    def fake(spec, **kw):
        seen.append(kw.get("device_map"))
        raise _Reached

    monkeypatch.setattr(sources, "load_model", fake)
    monkeypatch.setattr(adapt_trainer, "load_model", fake)
    sae = _sae(tmp_path / "sae", stories_model_path)
    args = build_parser().parse_args(["eval", "--sae", sae, "--data", str(tinystories_valid), "--device-map", "auto",
                                      "--out", str(tmp_path / "e")])
    with pytest.raises(_Reached):
        args.func(args)
    with pytest.raises(_Reached):
        build(AdaptConfig(model=str(stories_model_path), saes=[sae], data=str(tinystories_valid), device="cpu",
                          device_map="balanced"))
    args = build_parser().parse_args(["adapt", "train", "--sae", sae, "--data", str(tinystories_valid),
                                      "--device-map", "sequential", "--out", str(tmp_path / "a")])
    with pytest.raises(_Reached):
        args.func(args)
    assert seen == ["auto", "balanced", "sequential"]
    assert build_parser().parse_args(["eval", "--sae", sae, "--data", "x"]).device_map is None  # the field's default


def test_device_map_is_refused_for_llama2c_and_under_torchrun(monkeypatch, tmp_path, stories_model_path,
                                                             tinystories_valid):
    from saeforge.adapt import AdaptConfig, build
    from saeforge.eval.api import evaluate_many
    from saeforge.models import load_model

    sae = _sae(tmp_path / "sae", stories_model_path)
    for call in (lambda: evaluate_many([sae], data=str(tinystories_valid), device="cpu", device_map="auto"),
                 lambda: build(AdaptConfig(model=str(stories_model_path), saes=[sae], data=str(tinystories_valid),
                                           device="cpu", device_map="auto"))):
        with pytest.raises(SaeforgeError, match="--device-map is for Hugging Face models") as e:
            call()
        assert "\n" not in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SaeforgeError, match="torchrun gives each process its own GPU"):
        load_model(str(stories_model_path), device_map="auto")


EVAL_KW = dict(n_tokens=1500, context_len=64, batch_contexts=4, device="cpu", progress=False)


def _flat(x, where=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flat(v, f"{where}.{k}")
    elif isinstance(x, float):
        yield where, x


def test_eval_through_accelerate_matches_one_device(tmp_path, hf_stories, tinystories_valid):
    """``device_map="cpu"`` goes through accelerate's placement (hooks on every module); same metrics."""
    pytest.importorskip("accelerate")
    from saeforge.eval.api import evaluate_many

    sae = _sae(tmp_path / "sae", hf_stories)
    one = evaluate_many([sae], data=str(tinystories_valid), **EVAL_KW)["saes"]
    mapped = evaluate_many([sae], data=str(tinystories_valid), device_map="cpu", **EVAL_KW)["saes"]
    (name,) = one
    a = dict(_flat({s: one[name][s] for s in ("reconstruction", "downstream")}))
    b = dict(_flat({s: mapped[name][s] for s in ("reconstruction", "downstream")}))
    assert a.keys() == b.keys() and any("ce_spliced" in k for k in a)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9, nan_ok=True), k


def test_adapt_through_accelerate_matches_one_device(tmp_path, hf_stories, tinystories_valid):
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    from saeforge.adapt import AdaptConfig, build, fit

    sae = _sae(tmp_path / "sae", hf_stories)
    recs = {}
    for dm in (None, "cpu"):
        cfg = AdaptConfig(model=str(hf_stories), saes=[sae], data=str(tinystories_valid), rank=4, tokens=4 * 64 * 3,
                          batch_contexts=4, context_len=64, log_every=1, checkpoint_every=0, device="cpu",
                          dropout=0.0, device_map=dm)
        recs[dm] = [r["kl"] for r in fit(build(cfg), cfg, tmp_path / f"run_{dm}", progress=False)]
    assert len(recs[None]) == 3 and recs[None][-1] != recs[None][0]  # it trained
    assert recs["cpu"] == pytest.approx(recs[None], rel=1e-5)
