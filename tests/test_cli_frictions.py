"""Issue 17, point 5: small frictions a new user hits in the first hour.

One size parser for every count flag; ``--help`` shows each default once; a local path that does not exist
fails at once with "no such file or folder" (never tried as a hub id); an SAE run on another model than the
one it names gets one warning line saying how to override.
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from saeforge.cli import build_parser, main
from saeforge.errors import SaeforgeError


def _parsers(p: argparse.ArgumentParser, prog: str = "saeforge"):
    yield prog, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


# ---- one size parser ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, dest, want", [
    (["harvest", "--model", "m.bin", "--data", "d.txt", "--hooks", "h", "--out", "o", "--max-tokens", "200k"],
     "max_tokens", 200_000),
    (["harvest", "--model", "m.bin", "--data", "d.txt", "--hooks", "h", "--out", "o", "--shard-tokens", "64k"],
     "shard_tokens", 64_000),
    (["train", "--data", "c", "--tokens", "200k", "--width", "16k"], "width", 16_000),
    (["train", "--data", "c", "--tokens", "200k"], "tokens", 200_000),
    (["eval", "--sae", "s", "--data", "d", "--tokens", "30k", "--n2g-contexts", "1e3"], "n2g_contexts", 1000),
    (["adapt", "train", "--sae", "s", "--data", "d", "--tokens", "1M"], "tokens", 1_000_000),
    (["demo", "--tokens", "2M"], "tokens", 2_000_000),
])
def test_count_flags_share_one_parser(argv, dest, want):
    assert getattr(build_parser().parse_args(argv), dest) == want


def test_sweep_widths_and_bad_counts():
    from saeforge.train.sweep import parse_list

    assert parse_list("512,16k", "count") == [512, 16_000]
    with pytest.raises(SaeforgeError, match="count"):
        parse_list("512,lots", "count")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["harvest", "--model", "m", "--data", "d", "--hooks", "h", "--out", "o",
                                   "--max-tokens", "2.5"])


# ---- --help: each default once -------------------------------------------------------------------------------
def test_help_shows_each_default_once():
    seen = 0
    for prog, p in _parsers(build_parser()):
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.help or a.help == argparse.SUPPRESS:
                continue
            text = fmt._expand_help(a) if a.help else ""
            assert text.lower().count("default") <= 1, f"{prog} {a.option_strings}: {text!r}"
            seen += "default" in text.lower()
        p.format_help()  # every help page renders
    assert seen > 40
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(out.getvalue().split())
    assert "(default 128)" in help_text and "(default 128) (default: 128)" not in help_text


# ---- missing local paths fail at once -------------------------------------------------------------------------
def test_looks_local():
    from saeforge.paths import looks_local

    for s in ("./x", "../x", "/x/y", "~/x", "model.bin", "sae.safetensors", "valid.txt", "t.jsonl", "d.parquet",
              "tests/nowhere"):  # tests/ exists here: its child is a local path
        assert looks_local(s), s
    for s in ("gpt2", "openai-community/gpt2", "google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105"):
        assert not looks_local(s), s


@pytest.fixture
def no_hub(monkeypatch):
    """Fail loudly if anything reaches for the Hugging Face Hub."""
    from saeforge.formats import hub

    def boom(**kw):
        raise AssertionError(f"hub download attempted: {kw}")

    monkeypatch.setattr(hub, "snapshot_download", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_paths_are_refused_at_once(tmp_path, no_hub, monkeypatch):
    from saeforge.data.text import iter_documents
    from saeforge.formats import load_sae
    from saeforge.models import load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for call in (lambda: load_model("runs/model.bin"), lambda: load_model("./hf_folder"),
                 lambda: load_model("runs/hf_model"), lambda: load_sae("runs/topk"), lambda: load_sae("./topk"),
                 lambda: load_sae(str(tmp_path / "nope")), lambda: list(iter_documents("runs/valid"))):
        t = time.perf_counter()
        with pytest.raises(SaeforgeError, match="no such file or folder") as e:
            call()
        assert "\n" not in str(e.value) and time.perf_counter() - t < 2.0


def test_cli_missing_path_one_line(tmp_path, capsys, no_hub, tinystories_valid, stories_model_path):
    for argv in (["eval", "--sae", str(tmp_path / "runs" / "topk"), "--data", str(tinystories_valid)],
                 ["eval", "--sae", "./no_such_sae", "--data", str(tinystories_valid)],
                 ["eval", "--sae", str(tmp_path), "--model", str(stories_model_path), "--data", "./valid.txt"],
                 ["harvest", "--model", "./missing.bin", "--data", str(tinystories_valid), "--hooks", "resid_post.1",
                  "--out", str(tmp_path / "c")]):
        capsys.readouterr()
        t = time.perf_counter()
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "no such file or folder" in err and len(err.splitlines()) == 1, (argv, err)
        assert time.perf_counter() - t < 10.0


# ---- model mismatch: one warning line -------------------------------------------------------------------------
def test_model_mismatch_line(stories_model_path):
    from saeforge.paths import model_mismatch

    m = str(stories_model_path)
    assert model_mismatch({"a": m}, f"llama2c:{m}", "eval", "--model") is None  # same model, other spelling
    assert model_mismatch({"a": None}, m, "eval", "--model") is None  # the SAE names none: nothing to compare
    line = model_mismatch({"a": "gpt2", "b": m}, m, "dashboard", "--model/--hook")
    assert line.count("\n") == 0 and "gpt2" in line and "SAE a " in line and "--model/--hook" in line


def test_eval_warns_once_on_other_model(stories_model_path, tinystories_valid, capsys):
    from saeforge.eval import evaluate
    from saeforge.models import load_model
    from saeforge.sae import create_sae, make_config

    lm = load_model(str(stories_model_path))
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=lm.d_model, d_sae=32, k=4, hook="resid_post.1"))
    sae.cfg.model = "openai-community/gpt2"
    capsys.readouterr()
    evaluate(sae, str(stories_model_path), str(tinystories_valid), n_tokens=256, context_len=32, progress=False,
             downstream=False)
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "openai-community/gpt2" in warn[0] and "--model/--hook" in warn[0], warn
    sae.cfg.model = str(stories_model_path)
    evaluate(sae, f"llama2c:{stories_model_path}", str(tinystories_valid), n_tokens=256, context_len=32,
             progress=False, downstream=False)
    assert "warning" not in capsys.readouterr().err


def test_dashboard_and_adapt_warn_once_on_other_model(stories_model_path, tinystories_valid, tmp_path, capsys):
    from saeforge.adapt import AdaptConfig
    from saeforge.adapt.trainer import build
    from saeforge.dashboard.build import DashboardConfig, open_source
    from saeforge.sae import create_sae, make_config

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=32, k=4, hook="resid_post.1"))
    sae.cfg.model = "openai-community/gpt2"
    sae.save(tmp_path / "sae")
    capsys.readouterr()
    cfg = DashboardConfig(sae=str(tmp_path / "sae"), data=str(tinystories_valid), out=str(tmp_path / "d"),
                          model=str(stories_model_path), context_len=32)
    open_source(cfg, sae, ["resid_post.1"], torch.device("cpu"))
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "dashboard" in warn[0] and "--model/--hook" in warn[0], warn
    build(AdaptConfig(model=str(stories_model_path), saes=[str(tmp_path / "sae")], data=str(tinystories_valid),
                      rank=2, tokens=64, batch_contexts=1, context_len=32, device="cpu"))
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "adapt" in warn[0] and "openai-community/gpt2" in warn[0], warn


def test_eval_hook_override(stories_model_path, tinystories_valid, tmp_path):
    from saeforge.cli import main
    from saeforge.eval import evaluate
    from saeforge.sae import create_sae, make_config

    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=32, k=4, hook="resid_post.1"))
    r = evaluate(sae, str(stories_model_path), str(tinystories_valid), n_tokens=256, context_len=32,
                 progress=False, downstream=False, hook="resid_post.0")
    assert r["sae"]["hook"] == "resid_post.0"
    sae.cfg.model = str(stories_model_path)
    sae.save(tmp_path / "sae")
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--data", str(tinystories_valid), "--tokens", "256",
                 "--context-len", "32", "--no-downstream", "--no-progress", "--hook", "resid_post.0",
                 "--out", str(tmp_path / "e")]) == 0


# ---- flags generated from the configs: one default each -----------------------------------------------------
def test_flag_defaults_are_the_config_defaults():
    """Every flag made from a config field (saeforge.config.config_flag) defaults to that field's default."""
    from saeforge.adapt.config import AdaptConfig
    from saeforge.config import config_values, field_default
    from saeforge.dashboard.build import DashboardConfig
    from saeforge.eval import EvalConfig
    from saeforge.train import TrainConfig

    cases = [
        (["train", "--data", "c"], TrainConfig, ["total_tokens", "batch_size", "lr", "lr_rule", "warmup_steps",
                                                 "decay_frac", "grad_clip", "dead_tokens", "log_every",
                                                 "checkpoint_every", "seed", "device", "dtype", "kernels",
                                                 "shard_latents"]),
        (["eval", "--sae", "s", "--data", "d"], EvalConfig, ["n_tokens", "context_len", "batch_contexts",
                                                              "chunk_batches", "dense_threshold", "sample_tokens",
                                                              "n2g_latents", "n2g_contexts", "ablation_positions"]),
        (["adapt", "train", "--sae", "s", "--data", "d"], AdaptConfig, ["rank", "alpha", "dropout", "lr", "tokens",
                                                                        "batch_contexts", "context_len", "seed"]),
        (["dashboard", "build", "s", "--data", "d", "--out", "o"], DashboardConfig,
         ["top_k", "n_bands", "n_logits", "n_neighbors", "checkpoint_rows", "device"]),
    ]
    parser = build_parser()
    for argv, cls, names in cases:
        got = config_values(cls, parser.parse_args(argv), names)
        assert got == {n: field_default(cls, n) for n in names}, argv[0]
