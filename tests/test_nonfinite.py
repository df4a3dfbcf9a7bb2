"""Non-finite values are refused where they enter: harvest, training (loss, gradients, weights), resume, eval;
and the issue-13 scenarios that used to give a silently wrong result now give the right one."""
from __future__ import annotations

import json
import math

import pytest
import torch

from saeforge.activations import Stream
from saeforge.activations.cache import ActivationCache, HarvestConfig, harvest
from saeforge.errors import NonFiniteError
from saeforge.sae import make_config
from saeforge.synthetic import SuperpositionStream
from saeforge.train import TrainConfig, Trainer

HOOK = "resid_post.2"
D, B = 16, 64


class _Poisoned(Stream):
    """A SuperpositionStream whose batch ``at`` (and every later one) holds NaN rows."""

    def __init__(self, at: int):
        self.inner = SuperpositionStream(d=D, n_features=32, p=0.06, batch_size=B, seed=1)
        self.hooks, self.d, self.at = self.inner.hooks, self.inner.d, at

    def iterate(self, skip_batches: int = 0):
        for i, b in enumerate(self.inner.iterate(skip_batches), start=skip_batches):
            if i >= self.at:
                for a in b.acts.values():
                    a[:10] = float("nan")
            yield b


def _tc(**kw):
    base = dict(total_tokens=40 * B, batch_size=B, lr=1e-3, log_every=5, checkpoint_every=10, device="cpu",
                dtype="float32", init_tokens=256)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch, opts", [("topk", {"k": 4}), ("relu", {}), ("jumprelu", {})])
def test_training_stops_at_the_first_nonfinite_loss_and_keeps_the_last_good_checkpoint(tmp_path, arch, opts):
    cfg = make_config(arch, d_in=D, d_sae=32, **opts)
    trainer = Trainer({"": cfg}, _Poisoned(at=23), _tc(), tmp_path)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit(progress=False)
    msg = str(e.value)
    assert "training diverged" in msg and "checkpoint of step 20 is kept" in msg and "\n" not in msg
    assert not (tmp_path / "sae.safetensors").exists()  # no NaN SAE is ever saved
    from saeforge.train.checkpoint import load_checkpoint

    meta, states, _ = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert meta["step"] == 20 and all(torch.isfinite(v).all() for v in states[""]["model"].values())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20] and all(math.isfinite(r["loss"]) for r in lines)


def test_nan_in_the_initialisation_sample_is_named(tmp_path):
    trainer = Trainer({"": make_config("topk", d_in=D, d_sae=32, k=4)}, _Poisoned(at=0), _tc(), tmp_path)
    with pytest.raises(NonFiniteError, match="NaN/Inf activations at hook"):
        trainer.fit(progress=False)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, stories_model_path, tinystories_train):
    out = tmp_path_factory.mktemp("nf") / "cache"
    harvest(HarvestConfig(model=str(stories_model_path), data=str(tinystories_train), hooks=[HOOK], out=str(out),
                          context_len=32, batch_contexts=8, shard_tokens=512, max_tokens=1500), progress=False)
    return out


def _poison_rows(monkeypatch, rows_to_poison=(3, 7)):
    import saeforge.activations.cache as cache_mod

    real = cache_mod.forward_rows
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # the second forward batch
            out[f"acts.{HOOK}"][list(rows_to_poison)] = float("inf")
        return out

    monkeypatch.setattr(cache_mod, "forward_rows", poisoned)


def test_harvest_refuses_nonfinite_rows_naming_them(tmp_path, monkeypatch, stories_model_path, tinystories_train):
    _poison_rows(monkeypatch)
    cfg = HarvestConfig(model=str(stories_model_path), data=str(tinystories_train), hooks=[HOOK], out=str(tmp_path / "c"),
                        context_len=32, batch_contexts=8, shard_tokens=512, max_tokens=1500)
    with pytest.raises(NonFiniteError) as e:
        harvest(cfg, progress=False)
    assert "2 rows" in str(e.value) and "doc " in str(e.value) and "pos " in str(e.value)
    assert "--on-nonfinite skip" in str(e.value)


def test_harvest_on_nonfinite_skip_leaves_those_rows_out(tmp_path, monkeypatch, stories_model_path, tinystories_train,
                                                         small_cache):
    _poison_rows(monkeypatch)
    cfg = HarvestConfig(model=str(stories_model_path), data=str(tinystories_train), hooks=[HOOK], out=str(tmp_path / "c"),
                        context_len=32, batch_contexts=8, shard_tokens=512, max_tokens=1500, on_nonfinite="skip")
    cache = ActivationCache(harvest(cfg, progress=False))
    assert cache.n_tokens == 1500 - 2 and cache.manifest["config"]["on_nonfinite"] == "skip"
    clean = ActivationCache(small_cache)
    assert "on_nonfinite" not in clean.manifest["config"]  # the default leaves older caches' bytes alone
    rows = torch.cat([cache.shard(i)[f"acts.{HOOK}"] for i in range(cache.n_shards)])
    assert torch.isfinite(rows).all()


def test_nan_rows_in_a_cache_stop_training_even_without_read_verification(tmp_path, small_cache):
    """The issue's worst case: 10 NaN rows in a cache. Read-time verification refuses the shard; with it off,
    the trainer still stops at the first non-finite loss instead of saving a NaN SAE."""
    import shutil

    from safetensors.torch import load_file

    from saeforge.activations.stream import CachedStream
    from saeforge.io import save_safetensors_atomic, sha256_bytes

    bad = tmp_path / "cache"
    shutil.copytree(small_cache, bad)
    f = bad / "shard_00001.safetensors"
    t = load_file(str(f))
    t[f"acts.{HOOK}"][:10] = float("nan")
    m = json.loads((bad / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_bytes(save_safetensors_atomic(f, t))
    (bad / "manifest.json").write_text(json.dumps(m))
    cfg = make_config("topk", d_in=64, d_sae=128, k=8, hook=HOOK)
    tc = TrainConfig(total_tokens=6000, batch_size=256, log_every=2, checkpoint_every=0, device="cpu",
                     dtype="float32", init_tokens=256)
    with pytest.raises(NonFiniteError, match="holds NaN/Inf activations"):
        Trainer({"": cfg}, CachedStream(bad, batch_size=256, shuffle_buffer=512), tc, tmp_path / "a").fit(progress=False)
    stream = CachedStream(bad, batch_size=256, shuffle_buffer=512)
    stream.cache.verify_reads = False
    with pytest.raises(NonFiniteError, match="training diverged|NaN/Inf activations at hook"):
        Trainer({"": cfg}, stream, tc, tmp_path / "b").fit(progress=False)
    assert not (tmp_path / "b" / "sae.safetensors").exists()


def test_sae_from_a_cache_records_its_model_and_eval_needs_no_model_flag(tmp_path, small_cache, tinystories_valid,
                                                                         stories_model_path, capsys):
    """README's own lines: `train --data runs/cache` then `eval`/`adapt` without --model."""
    from saeforge.cli import main

    assert main(["train", "--data", str(small_cache), "--width", "128", "--k", "8", "--tokens", "2048",
                 "--batch-size", "256", "--shuffle-buffer", "1024", "--no-progress", "--out", str(tmp_path / "sae")]) == 0
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["model"] == str(stories_model_path.resolve()) and cfg["hook"] == HOOK
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--data", str(tinystories_valid), "--tokens", "96",
                 "--context-len", "32", "--no-downstream", "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    assert "fvu" in (tmp_path / "ev" / "eval.json").read_text()


def test_train_from_text_with_device_auto(tmp_path, stories_model_path, tinystories_train):
    from saeforge.cli import main

    assert main(["train", "--model", str(stories_model_path), "--data", str(tinystories_train), "--hook", HOOK,
                 "--width", "128", "--k", "8", "--tokens", "1024", "--batch-size", "256", "--shuffle-buffer", "1024",
                 "--context-len", "32", "--no-progress", "--out", str(tmp_path / "live")]) == 0  # --device auto
    assert json.loads((tmp_path / "live" / "cfg.json").read_text())["model"] == str(stories_model_path)


def test_resume_with_an_allowed_longer_budget(tmp_path, small_cache):
    from saeforge.cli import main

    argv = ["train", "--data", str(small_cache), "--width", "128", "--k", "8", "--batch-size", "256",
            "--shuffle-buffer", "1024", "--no-progress", "--out", str(tmp_path / "sae"), "--log-every", "2"]
    assert main(argv + ["--tokens", "1024"]) == 0
    assert main(argv + ["--tokens", "2048", "--resume", "--allow-change", "total_tokens"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_eval_reports_nan_metrics_loudly(tmp_path, monkeypatch, small_cache, tinystories_valid, stories_model_path):
    """NaN reconstructions (from a model or data that gives non-finite values) end as a one-line error naming the
    metrics; eval.json keeps them as null instead of a table that silently drops them."""
    import saeforge.eval.runner as runner
    from saeforge.eval import evaluate
    from saeforge.sae import create_sae

    real = runner.encode_decode

    def nan_decode(sae, x):
        f, y_hat = real(sae, x)
        return f, torch.full_like(y_hat, float("nan"))

    monkeypatch.setattr(runner, "encode_decode", nan_decode)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook=HOOK, model=str(stories_model_path)))
    with pytest.raises(NonFiniteError) as e:
        evaluate(sae, data=str(tinystories_valid), n_tokens=96, context_len=32, downstream=False, progress=False,
                 out=tmp_path / "ev")
    assert "reconstruction.mse" in str(e.value) and "reconstruction.fvu" in str(e.value)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["reconstruction"]["fvu"] is None
