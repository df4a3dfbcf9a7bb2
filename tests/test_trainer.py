"""The trainer: exact resume, metrics, many SAEs in one pass, recipe hooks, and ``saeforge sweep``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from saeforge.train.sweep import build_grid, run_sweep
from saeforge.errors import SaeforgeError
from saeforge.sae import create_sae, make_config
from saeforge.synthetic import SuperpositionStream
from saeforge.train import TrainConfig, Trainer
from saeforge.train.optim import ScheduleFreeSign

D, B = 16, 128


def _stream(n_batches=None):
    return SuperpositionStream(d=D, n_features=32, p=0.06, batch_size=B, seed=2, n_batches=n_batches)


def _tc(steps, **kw):
    base = dict(total_tokens=steps * B, batch_size=B, lr=3e-3, log_every=5, checkpoint_every=0, device="cpu",
                dtype="float32", dead_tokens=3 * B, init_tokens=512)
    return TrainConfig(**{**base, **kw})


def _group():
    return {
        "btk": make_config("batchtopk", d_in=D, d_sae=32, k=3, threshold_start_step=2, threshold_beta=0.5),
        "jr": make_config("jumprelu", d_in=D, d_sae=32, init_fire_count=8.0),
        # Bricken resampling due at step 15, after the resume point: exercises the look-ahead on resume
        "mono": make_config("relu", d_in=D, d_sae=32, recipe="monosemanticity", resample_every_tokens=15 * B,
                            resample_window_tokens=0, resample_max=1, resample_rows=3 * B),
        "mat": make_config("matryoshka", d_in=D, d_sae=32, k=3, group_fractions=[0.25, 0.75]),
    }


def _weights(folder):
    return load_file(str(folder / "sae.safetensors"))


def _full_cut_and_resumed(group, N, tmp_path):
    """Train ``group()`` for N steps uninterrupted, and again cut after the step-N/2 checkpoint (its data runs
    out) then resumed from that checkpoint; assert the resumed SAEs equal the uninterrupted ones, weights and
    cfg.json. Returns the cut and the resumed trainers."""
    full = Trainer(group(), _stream(), _tc(N, checkpoint_every=N // 2), tmp_path / "full")
    full.fit(progress=False)
    cut = Trainer(group(), _stream(n_batches=N // 2), _tc(N, checkpoint_every=N // 2), tmp_path / "cut")
    with pytest.raises(SaeforgeError, match="ran out"):
        cut.fit(progress=False)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "cut" / "checkpoint.safetensors", resumed_dir / "checkpoint.safetensors")
    resumed = Trainer(group(), _stream(), _tc(N, checkpoint_every=N // 2), resumed_dir)
    resumed.fit(resume=True, progress=False)
    for name in group():
        a, b = _weights(tmp_path / "full" / name), _weights(resumed_dir / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        assert json.loads((tmp_path / "full" / name / "cfg.json").read_text()) == \
            json.loads((resumed_dir / name / "cfg.json").read_text())
    return cut, resumed


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path):
    N = 20
    cut, resumed = _full_cut_and_resumed(_group, N, tmp_path)
    assert resumed.global_step == N and resumed.tokens == N * B
    resumed_dir = tmp_path / "resumed"
    # the resampling really happened after the resume point
    lines = [json.loads(l) for l in (resumed_dir / "mono" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("resampled", 0) > 0 for r in lines)


def test_a_target_l0_run_resumes_after_its_controller_has_steered(tmp_path):
    """The controller's state lives in the config's metadata, which changes during training: a checkpoint taken
    after it steered resumes (the identity is the config as given) and ends where the uninterrupted run ends."""
    def group():
        return {"relu": make_config("relu", d_in=D, d_sae=32, target_l0=4),
                "jr": make_config("jumprelu", d_in=D, d_sae=32, target_l0=4, init_fire_count=8.0)}

    N = 20
    cut, _ = _full_cut_and_resumed(group, N, tmp_path)  # asserts the resumed run equals the uninterrupted one
    steered = cut.runs["relu"].sae.cfg
    assert steered.metadata["target_l0_step"] == N // 2 and "target_l0_error" in steered.metadata
    assert steered.l1_coefficient != group()["relu"].l1_coefficient  # it steered before the checkpoint


def test_the_controller_steers_only_on_windows_after_the_warm_up():
    """A metrics line whose window began inside the recipe's warm-up records its error but does not steer."""
    sae = create_sae(make_config("relu", d_in=D, d_sae=32, target_l0=4))  # λ warm-up: the first 5% of steps
    lam0 = sae.cfg.l1_coefficient
    sae.after_metrics({"l0": 40.0}, 50, 1000)  # window 0-50 began in the warm-up (50 steps): record only
    assert sae.cfg.l1_coefficient == lam0 and sae.cfg.metadata["target_l0_step"] == 50
    sae.after_metrics({"l0": 40.0}, 100, 1000)  # window 50-100, L0 not closing in: steer up by the clip 4/3
    assert sae.cfg.l1_coefficient == pytest.approx(lam0 * 4 / 3)
    sae.after_metrics({"l0": 8.0}, 150, 1000)  # closing in (|log 2| < 0.9 |log 10|): hold
    assert sae.cfg.l1_coefficient == pytest.approx(lam0 * 4 / 3)


def test_a_trainer_driven_step_by_step_matches_fit(tmp_path):
    """The public step API (init_from_data, step, save) gives the same weights and metric lines as fit."""
    from saeforge.train.trainer import first_rows

    N = 16  # past the "mono" SAE's resampling at step 15
    tc = _tc(N, log_every=4)
    fitted = Trainer(_group(), _stream(), tc, tmp_path / "fit").fit(progress=False)

    driven = Trainer(_group(), _stream(), tc, tmp_path / "step")
    driven.init_from_data(first_rows(_stream(), tc.init_tokens))
    batches = list(_stream(n_batches=N + 4).iterate(0))
    lines = []
    for i in range(N):
        got = driven.step(batches[i], peek=lambda rows, i=i: batches[i + 1:])  # upcoming rows, for resampling
        assert (got != {}) == ((i + 1) % 4 == 0)
        lines.append(got)
    saved = driven.save(tmp_path / "saved")
    assert driven.global_step == N and driven.tokens == N * B
    assert not (tmp_path / "step" / "metrics.jsonl").exists()  # step writes nothing; fit's policy does
    for name in _group():
        sa, sb = fitted[name].state_dict(), saved[name].state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
        assert _weights(tmp_path / "saved" / name).keys() == _weights(tmp_path / "fit" / name).keys()
        written = [json.loads(l) for l in (tmp_path / "fit" / name / "metrics.jsonl").read_text().splitlines()]
        stepped = [got[name] for got in lines if got]
        assert name != "mono" or any(r.get("resampled", 0) > 0 for r in stepped)
        for a, b in zip(written, stepped, strict=True):
            assert {k: v for k, v in a.items() if k != "elapsed_s"} == {k: v for k, v in b.items() if k != "elapsed_s"}


def test_metrics_jsonl_is_written(tmp_path):
    Trainer({"": make_config("topk", d_in=D, d_sae=32, k=3)}, _stream(), _tc(12, log_every=4), tmp_path).fit(
        progress=False)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12]
    for r in lines:
        assert {"step", "tokens", "lr", "loss", "fvu", "l0", "dead_frac", "elapsed_s", "mse"} <= set(r)
        assert 0 <= r["fvu"] < 2 and r["l0"] == pytest.approx(3, abs=0.5)
    assert (tmp_path / "cfg.json").exists() and (tmp_path / "train_cfg.json").exists()


def test_saes_trained_together_equal_saes_trained_alone(tmp_path):
    group = _group()
    together = Trainer(group, _stream(), _tc(8), tmp_path / "together").fit(progress=False)
    for name, cfg in _group().items():
        alone = Trainer({"": cfg}, _stream(), _tc(8), tmp_path / name).fit(progress=False)[""]
        sa, sb = together[name].state_dict(), alone.state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)


def test_recipe_optimizer_defaults_fill_what_the_train_config_leaves_open(tmp_path):
    cfgs = {"g": make_config("gated", d_in=D, d_sae=32), "t": make_config("topk", d_in=D, d_sae=32, k=3)}
    tr = Trainer(cfgs, _stream(), _tc(2, lr=None, betas=None, eps=None, lr_rule="published"), tmp_path)
    g = tr.runs["g"].opt.param_groups[0]
    assert g["lr"] == pytest.approx(5e-5)  # Rajamanoharan et al. 2024a
    # Gated's beta1 is measured (0.5; docs/recipes/gated.md); the paper's (0, 0.999) is an explicit TrainConfig.betas
    assert g["betas"] == (0.5, 0.999)
    paper = Trainer(cfgs, _stream(), _tc(2, lr=None, betas=(0.0, 0.999), eps=None, lr_rule="published"), tmp_path / "p")
    assert paper.runs["g"].opt.param_groups[0]["betas"] == (0.0, 0.999)
    # TopK's default optimizer is schedule-free sign descent; its published lr is sparsify's 5e-3/sqrt(n/2^14)
    t = tr.runs["t"].opt
    assert isinstance(t, ScheduleFreeSign) and t.param_groups[0]["lr"] == pytest.approx(5e-3 / (32 / 2**14) ** 0.5)
    adam = Trainer(cfgs, _stream(), _tc(2, lr=None, betas=None, eps=None, lr_rule="published", optimizer="adam"),
                   tmp_path / "a")
    t = adam.runs["t"].opt.param_groups[0]
    assert t["betas"] == (0.9, 0.999) and t["lr"] == pytest.approx(2e-4 / (32 / 2**14) ** 0.5)  # Gao et al.
    # the default rule: Gao et al.'s 2e-4/sqrt(n/2^14) moved from d = 768 to d_in as 1/sqrt(d_in), times
    # LR_SCALE, for every Adam-trained architecture (betas stay the recipe's); sign descent: SIGNUM_LR0/sqrt(n/2^14)
    from saeforge.sae.base import LR_SCALE, SIGNUM_LR0

    scaled = Trainer(cfgs, _stream(), _tc(2, lr=None, betas=None, eps=None), tmp_path / "s")
    assert scaled.runs["g"].opt.param_groups[0]["lr"] == pytest.approx(LR_SCALE * 2e-4 * (2**14 / 32) ** 0.5
                                                                       * (768 / D) ** 0.5)
    assert scaled.runs["t"].opt.param_groups[0]["lr"] == pytest.approx(SIGNUM_LR0 * (2**14 / 32) ** 0.5)
    assert scaled.runs["g"].opt.param_groups[0]["betas"] == (0.5, 0.999)
    explicit = Trainer(cfgs, _stream(), _tc(2, betas=(0.5, 0.9)), tmp_path / "x")
    assert explicit.runs["g"].opt.param_groups[0]["betas"] == (0.5, 0.9)


def test_free_norm_recipes_take_their_own_adam_scale(tmp_path):
    # ReLU anthropic2024 and JumpReLU anthropic2025 (no decoder-norm constraint) steered to a target L0 use
    # FREE_NORM_LR_SCALE (4 x LR_SCALE, measured); their unit-norm siblings and every other Adam recipe keep LR_SCALE
    from saeforge.sae.base import FREE_NORM_LR_SCALE, LR_SCALE

    assert FREE_NORM_LR_SCALE == 4 * LR_SCALE
    gao = 2e-4 * (2**14 / 32) ** 0.5 * (768 / D) ** 0.5  # Gao et al.'s lr moved to d_in = D, n = 32
    t = {"target_l0": 8}  # the scale was measured with the coefficient steered; a fixed one keeps LR_SCALE
    cases = {"relu": (t, FREE_NORM_LR_SCALE), "relu_fixed": ({}, LR_SCALE),
             "mono": ({"recipe": "monosemanticity", **t}, LR_SCALE), "jumprelu": (t, FREE_NORM_LR_SCALE),
             "jumprelu_fixed": ({}, LR_SCALE), "gs": ({"recipe": "gemmascope", **t}, LR_SCALE),
             "gated": (t, LR_SCALE)}
    arch = {"mono": "relu", "gs": "jumprelu", "relu_fixed": "relu", "jumprelu_fixed": "jumprelu"}
    cfgs = {name: make_config(arch.get(name, name), d_in=D, d_sae=32, **kw) for name, (kw, _) in cases.items()}
    tr = Trainer(cfgs, _stream(), _tc(2, lr=None), tmp_path)
    for name, (_, scale) in cases.items():
        assert tr.runs[name].opt.param_groups[0]["initial_lr"] == pytest.approx(scale * gao), name


def test_sign_descent_defaults_average_power_and_dead_window(tmp_path):
    # schedule-free sign descent weighs iterate k by (k+1)^r, r = 2 shared and 3 for TopK, and counts a latent dead
    # after 6 tokens per latent without firing; Adam keeps the run-length window (a tenth, at most 10M) and an
    # explicit value wins for both; TopK's AuxK α is 1/16, BatchTopK's the published 1/32 (measured:
    # docs/recipes/README.md, "Seventh session" and "Eleventh session")
    from saeforge.train.config import DEAD_TOKENS, SIGNUM_AVERAGE_POWER, SIGNUM_DEAD_TOKENS_PER_LATENT

    assert (SIGNUM_AVERAGE_POWER, SIGNUM_DEAD_TOKENS_PER_LATENT) == (2.0, 6)
    assert make_config("topk", d_in=D, d_sae=64).aux_coef == 1 / 16
    assert make_config("batchtopk", d_in=D, d_sae=64).aux_coef == 1 / 32
    tc = TrainConfig(total_tokens=3_000_000, batch_size=4096)
    assert tc.dead_window("signum", 2048) == 12288 and tc.dead_window("signum", 6144) == 36864
    assert tc.dead_window("signum", 64) == 4096  # at least one batch
    assert tc.dead_window("signum", 10**7) == DEAD_TOKENS  # at most Gao et al.'s 10M
    assert tc.dead_window("adam", 2048) == 300_000
    assert TrainConfig(total_tokens=10**9).dead_window("adam", 2048) == DEAD_TOKENS
    assert TrainConfig(dead_tokens=5000).dead_window("signum", 2048) == 5000
    assert tc.average_power_or_default() == 2.0 and TrainConfig(average_power=0).average_power_or_default(3.0) == 0
    assert tc.average_power_or_default(3.0) == 3.0
    cfgs = {"topk": make_config("topk", d_in=D, d_sae=64, k=4), "relu": make_config("relu", d_in=D, d_sae=64),
            "btk": make_config("batchtopk", d_in=D, d_sae=64, k=4)}
    tr = Trainer(cfgs, _stream(), _tc(2, lr=None, total_tokens=10 * 4096, batch_size=4096, dead_tokens=None), tmp_path)
    assert isinstance(tr.runs["topk"].opt, ScheduleFreeSign) and tr.runs["topk"].opt.defaults["power"] == 3.0
    assert tr.runs["btk"].opt.defaults["power"] == 2.0  # BatchTopK (and Matryoshka) keep the shared r = 2
    assert tr.runs["topk"].dead_tokens == 4096  # 6 · 64 = 384 tokens, raised to one batch
    assert tr.runs["relu"].dead_tokens == 4096  # adam: a tenth of 40,960 tokens
    tr2 = Trainer({"a": cfgs["topk"]}, _stream(), _tc(2, optimizer="adam", dead_tokens=777), tmp_path / "b")
    assert tr2.runs["a"].dead_tokens == 777


# ---- sweep ----------------------------------------------------------------------------------------
def test_build_grid_names_and_options():
    d = {"h": 16, "t": 8, "a": 16, "b": 16}
    grid = build_grid(["topk", "relu", "jumprelu"], [32, 64], [2, 4], [0.5], d=d, hook="h",
                      sets={"aux_coef": 0.1}, recipe="gemmascope")
    assert sorted(grid) == sorted([
        "topk_w32_k2", "topk_w32_k4", "topk_w64_k2", "topk_w64_k4", "relu_w32_lam0.5", "relu_w64_lam0.5",
        "jumprelu-gemmascope_w32_lam0.5", "jumprelu-gemmascope_w64_lam0.5"])
    assert grid["topk_w64_k4"].k == 4 and grid["topk_w64_k4"].aux_coef == 0.1 and grid["topk_w64_k4"].d_sae == 64
    assert grid["jumprelu-gemmascope_w32_lam0.5"].recipe == "gemmascope"
    assert grid["relu_w32_lam0.5"].l1_coefficient == 0.5
    tc = build_grid(["relu"], [32], [], [], d=d, hook="h", target="t")
    assert tc["relu_w32"].d_out == 8 and tc["relu_w32"].apply_b_dec_to_input is False
    cc = build_grid(["crosscoder"], [32], [], [1.0], d=d, hook=None, hooks=["a", "b"])
    assert cc["crosscoder_w32_lam1"].d_in == 32 and cc["crosscoder_w32_lam1"].hooks == ["a", "b"]
    with pytest.raises(SaeforgeError, match="belong to none"):
        build_grid(["topk"], [32], [2], [], d=d, hook="h", sets={"l1_coefficient": 1})
    with pytest.raises(SaeforgeError, match="recipe"):
        build_grid(["topk"], [32], [2], [], d=d, hook="h", recipe="gemmascope")
    with pytest.raises(SaeforgeError, match="--hooks"):
        build_grid(["crosscoder"], [32], [], [], d=d, hook="h")


def test_run_sweep_trains_the_grid_from_one_pass_and_indexes_it(tmp_path):
    grid = build_grid(["topk", "batchtopk"], [32], [2, 4], [], d={"synthetic": D}, hook="synthetic")
    index = run_sweep(grid, _stream(), _tc(6), tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "sweep.json").read_text())
    assert on_disk == index and index["steps"] == 6 and len(index["saes"]) == 4
    for e in index["saes"]:
        assert (tmp_path / e["path"] / "sae.safetensors").exists()
        assert e["sparsity_field"] == "k" and e["final"]["l0"] > 0


@pytest.mark.slow
def test_sweep_cli_on_a_harvested_cache(tmp_path, stories_model_path, tinystories_train):
    from saeforge.activations.cache import HarvestConfig, harvest
    from saeforge.cli import main

    cache = tmp_path / "acts"
    harvest(HarvestConfig(model=str(stories_model_path), data=str(tinystories_train), hooks=["resid_post.2"],
                          out=str(cache), context_len=32, batch_contexts=8, shard_tokens=1024, max_tokens=2048),
            progress=False)
    out = tmp_path / "sweep"
    rc = main(["sweep", "--data", str(cache), "--arch", "topk,relu", "--width", "128", "--k", "8", "--lam", "1",
               "--tokens", "2048", "--batch-size", "256", "--device", "cpu", "--dtype", "float32",
               "--shuffle-buffer", "1024", "--no-progress", "--out", str(out)])
    assert rc == 0
    index = json.loads((out / "sweep.json").read_text())
    assert sorted(e["name"] for e in index["saes"]) == ["relu_w128_lam1", "topk_w128_k8"]
    cfg = json.loads((out / "topk_w128_k8" / "cfg.json").read_text())
    assert cfg["hook"] == "resid_post.2" and cfg["d_in"] == 64
