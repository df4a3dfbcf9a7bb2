"""--log-to: the trackers get the same numbers as metrics.jsonl (the source of truth), on rank 0 only."""
from __future__ import annotations

import json
import sys

import pytest

from saeforge import tracking
from saeforge.train.sweep import build_grid, run_sweep
from saeforge.errors import SaeforgeError
from saeforge.sae import make_config
from saeforge.synthetic import SuperpositionStream
from saeforge.tracking import TrackingConfig
from saeforge.train import TrainConfig, Trainer

D, B = 16, 128
TB = TrackingConfig(log_to=("tensorboard",))


def _stream():
    return SuperpositionStream(d=D, n_features=32, p=0.06, batch_size=B, seed=2)


def _tc(steps, **kw):
    return TrainConfig(**{**dict(total_tokens=steps * B, batch_size=B, lr=3e-3, log_every=4, checkpoint_every=0,
                                 device="cpu", dtype="float32", dead_tokens=3 * B, init_tokens=512), **kw})


def _events(folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _lines(folder):
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard")
    Trainer({"": make_config("topk", d_in=D, d_sae=32, k=3)}, _stream(), _tc(12), tmp_path, TB).fit(progress=False)
    lines, ev = _lines(tmp_path), _events(tmp_path)
    assert [r["step"] for r in lines] == [4, 8, 12]
    for key in ("loss", "fvu", "l0", "dead_frac", "lr"):
        assert [s for s, _ in ev[key]] == [r["step"] for r in lines]
        assert [v for _, v in ev[key]] == pytest.approx([r[key] for r in lines], rel=1e-6, abs=1e-12)
    assert "step" not in ev


def test_sweep_logs_every_sae_beside_its_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    grid = build_grid(["topk"], [32], [2, 4], [], d={"synthetic": D}, hook="synthetic")
    run_sweep(grid, _stream(), _tc(8), tmp_path, progress=False, tracking=TB)
    for name in grid:
        lines, ev = _lines(tmp_path / name), _events(tmp_path / name)
        assert [v for _, v in ev["fvu"]] == pytest.approx([r["fvu"] for r in lines], rel=1e-6)


def test_off_by_default_and_on_other_ranks(tmp_path, monkeypatch):
    Trainer({"": make_config("topk", d_in=D, d_sae=32, k=3)}, _stream(), _tc(4), tmp_path / "a").fit(progress=False)
    assert not (tmp_path / "a" / "tensorboard").exists()
    from saeforge import distributed

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    Trainer({"": make_config("topk", d_in=D, d_sae=32, k=3)}, _stream(), _tc(4), tmp_path / "b", TB).fit(
        progress=False)
    assert not (tmp_path / "b" / "tensorboard").exists()


def test_flags_parse_comma_lists_and_repeats():
    assert TrackingConfig.from_flags(["wandb,tensorboard", "wandb"]).log_to == ("wandb", "tensorboard")
    assert TrackingConfig.from_flags(None).log_to == ()
    with pytest.raises(SaeforgeError, match="not a tracker"):
        TrackingConfig.from_flags(["mlflow"])
    with pytest.raises(SaeforgeError, match="log_to"):
        TrackingConfig(log_to=("mlflow",))


@pytest.mark.parametrize("command", [["train"], ["sweep", "--arch", "topk", "--width", "8"]])
def test_a_missing_library_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys, command):
    from saeforge.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    rc = main([*command, "--data", str(tmp_path / "nothing"), "--log-to", "wandb", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "pip install 'saeforge-toolkit[wandb]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_adapt_train_has_the_flag(capsys):
    from saeforge.cli import main

    with pytest.raises(SystemExit):
        main(["adapt", "train", "--help"])
    assert "--log-to" in capsys.readouterr().out


def test_adapt_train_logs_to_tensorboard_and_takes_a_transformerlens_hook(tmp_path, stories_model_path,
                                                                         tinystories_valid):
    pytest.importorskip("tensorboard")
    pytest.importorskip("peft")
    import torch

    from saeforge.cli import main
    from saeforge.sae import create_sae

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook="resid_post.1", model=str(stories_model_path)))
    path = str(sae.save(tmp_path / "sae"))
    out = tmp_path / "run"
    rc = main(["adapt", "train", "--sae", path, "--hook", "blocks.2.hook_resid_post", "--data",
               str(tinystories_valid), "--rank", "8", "--tokens", "512", "--batch-contexts", "4", "--context-len",
               "64", "--eval-tokens", "300", "--no-progress", "--device", "cpu", "--log-to", "tensorboard",
               "--out", str(out)])
    assert rc == 0
    lines, ev = _lines(out), _events(out)
    assert [s for s, _ in ev["kl"]] == [r["step"] for r in lines] and lines
    assert [v for _, v in ev["kl"]] == pytest.approx([r["kl"] for r in lines], rel=1e-6)
    manifest = json.loads((out / "adapt.json").read_text())
    assert manifest["saes"][0]["hook"] == "blocks.2.hook_resid_post"


def test_wandb_gets_the_metric_lines_through_its_api(tmp_path, monkeypatch):
    """wandb itself is not a test dependency: a stand-in module records the calls saeforge makes."""
    import types

    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    grid = build_grid(["topk"], [32], [2, 4], [], d={"synthetic": D}, hook="synthetic")
    run_sweep(grid, _stream(), _tc(8), tmp_path, progress=False,
              tracking=TrackingConfig(log_to=("wandb",), project="p"))
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and "train" in calls[0][1]["config"]
    assert calls[-1] == ("finish",)
    for name in grid:
        lines = _lines(tmp_path / name)
        logged = [(c[2], c[1][f"{name}/fvu"]) for c in calls if c[0] == "log" and f"{name}/fvu" in c[1]]
        assert logged == [(r["step"], pytest.approx(r["fvu"])) for r in lines]


def test_resume_purges_the_events_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from saeforge.errors import SaeforgeError as Err

    cfg = dict(checkpoint_every=6)
    sae = lambda: {"": make_config("topk", d_in=D, d_sae=32, k=3)}  # noqa: E731
    cut = SuperpositionStream(d=D, n_features=32, p=0.06, batch_size=B, seed=2, n_batches=9)
    with pytest.raises(Err, match="ran out"):  # logged steps 4 and 8, checkpoint at 6
        Trainer(sae(), cut, _tc(16, **cfg), tmp_path, TB).fit(progress=False)
    Trainer(sae(), _stream(), _tc(16, **cfg), tmp_path, TB).fit(resume=True, progress=False)
    lines, ev = _lines(tmp_path), _events(tmp_path)
    assert [r["step"] for r in lines] == [4, 8, 12, 16]
    assert [s for s, _ in ev["fvu"]] == [4, 8, 12, 16]  # the first run's step 8 was purged, not duplicated
    assert [v for _, v in ev["fvu"]] == pytest.approx([r["fvu"] for r in lines], rel=1e-6)
