"""Issue 17, point 4: eval's optional sections have knobs (EvalConfig fields and `saeforge eval` flags), record
their cost, and share the SAE-independent model work across SAEs (same numbers as separate runs)."""
from __future__ import annotations

import json

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.eval.runner import EvalConfig

TINY = dict(n_tokens=512, context_len=32, batch_contexts=8, downstream=False, progress=False)


@pytest.fixture(scope="module")
def lm(stories_model_path):
    from saeforge.models import load_model

    return load_model(str(stories_model_path))


def _sae(lm, seed, d_sae=64):
    from saeforge.sae import create_sae, make_config

    torch.manual_seed(seed)
    return create_sae(make_config("topk", d_in=lm.d_model, d_sae=d_sae, k=4, hook="resid_post.1"))


def _task_file(path, tinystories_valid):
    """Two user tasks over real sentences: positives are the word 'the' and every 'a'."""
    docs = [d for d in open(tinystories_valid, encoding="utf-8").read().split("\n\n") if d.strip()][:40]
    lines = []
    for d in docs:
        d = d.strip()[:200]
        spans = [[i, i + 3] for i in range(len(d) - 2) if d[i:i + 3] == "the"]
        lines.append(json.dumps({"task": "the_word", "text": d, "spans": spans}))
        lines.append(json.dumps({"task": "letter_a", "text": d, "spans": [[i, i + 1] for i, c in enumerate(d)
                                                                           if c == "a"]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_config_knobs_are_checked():
    c = EvalConfig(extras=["probes", "n2g"], n2g_latents=4, n2g_contexts=30, probe_tasks=["comma"])
    assert EvalConfig.from_dict(c.to_dict()) == c
    for bad, flag in ((dict(extras=["nope"]), "--extras"), (dict(probe_tasks=["nope"]), "--probe-tasks"),
                      (dict(n2g_contexts=2), "--n2g-contexts"), (dict(n2g_latents=0), "--n2g-latents"),
                      (dict(probe_tasks=[]), "--probe-task")):
        with pytest.raises(SaeforgeError, match=flag):
            EvalConfig(**bad)


def test_all_with_knobs_records_cost_and_shares_work(lm, tmp_path, tinystories_valid):
    from saeforge.eval import evaluate_many
    from saeforge.eval.n2g import run_n2g
    from saeforge.eval.probes import run_probe_suite

    tasks = _task_file(tmp_path / "tasks.jsonl", tinystories_valid)
    saes = {"a": _sae(lm, 0), "b": _sae(lm, 1, d_sae=48)}
    out = tmp_path / "ev"
    combined = evaluate_many(saes, lm, str(tinystories_valid), out=out, run_all=True, **TINY,
                             extras=["probes", "n2g"], n2g_latents=3, n2g_contexts=18,
                             probe_tasks=["comma", "pronoun"], probe_task_file=str(tasks), probe_tokens=1000)
    for name, r in combined["saes"].items():
        ex = r["extras"]
        assert set(ex) == {"probes", "n2g"}  # --extras: ablation not run
        assert {t["task"] for t in ex["probes"]["tasks"]} == {"comma", "pronoun", "the_word", "letter_a"}
        s = ex["n2g"]["summary"]
        assert s["n_latents"] == 3 and s["n_train_contexts"] == 12 and s["n_heldout_contexts"] == 6
        for key in ("probes", "n2g"):
            assert ex[key]["seconds"] > 0 and ex[key]["options"]
    assert set(combined["seconds"]) == {"core", "probes", "n2g"}
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == "## Summary" and "## Cost" in md and "| probes | all |" in md
    # the shared activations give the numbers a separate run of SAE b gives
    alone_p = run_probe_suite(saes["b"], lm, str(tinystories_valid), n_tokens=1000, tasks=["comma", "pronoun"],
                              tasks_jsonl=str(tasks), context_len=32, batch_size=8, progress=False)
    got_p = combined["saes"]["b"]["extras"]["probes"]
    assert got_p["summary"]["probe_loss"] == pytest.approx(alone_p["summary"]["probe_loss"], rel=1e-6)
    assert got_p["summary"]["baseline_probe_loss"] == pytest.approx(alone_p["summary"]["baseline_probe_loss"],
                                                                    rel=1e-6)
    alone_n = run_n2g(saes["b"], lm, str(tinystories_valid), n_latents=3, n_train_contexts=12,
                      n_heldout_contexts=6, context_len=32, batch_size=8, progress=False)
    got_n = combined["saes"]["b"]["extras"]["n2g"]
    assert got_n["explanations"] == json.loads(json.dumps(alone_n["explanations"]))


def test_resume_reruns_a_section_whose_knobs_changed(lm, tmp_path, tinystories_valid):
    from saeforge.eval import evaluate_many

    out = tmp_path / "ev"
    kw = dict(out=out, run_all=True, extras=["n2g"], n2g_contexts=12, **TINY)
    a = evaluate_many({"a": _sae(lm, 0)}, lm, str(tinystories_valid), n2g_latents=2, **kw)
    b = evaluate_many({"a": _sae(lm, 0)}, lm, str(tinystories_valid), n2g_latents=2, resume=True, **kw)
    assert b["saes"]["a"]["extras"]["n2g"]["seconds"] == a["saes"]["a"]["extras"]["n2g"]["seconds"]  # kept
    c = evaluate_many({"a": _sae(lm, 0)}, lm, str(tinystories_valid), n2g_latents=3, resume=True, **kw)
    assert c["saes"]["a"]["extras"]["n2g"]["summary"]["n_latents"] == 3  # recomputed with the new knob


def test_cli_flags_reach_the_sections(lm, tmp_path, tinystories_valid, stories_model_path, capsys):
    from saeforge.cli import main

    sae = _sae(lm, 0)
    sae.cfg.model = str(stories_model_path)
    sae.save(tmp_path / "sae")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t", "text": "abc", "spans": [[0, 9]]}\n')
    base = ["eval", "--sae", str(tmp_path / "sae"), "--data", str(tinystories_valid), "--tokens", "512",
            "--context-len", "32", "--no-downstream", "--no-progress", "--all"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "e0"), "--probe-task-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:1" in err  # refused before any model pass
    assert main(base + ["--out", str(tmp_path / "e1"), "--probe-tasks", "nope"]) == 2
    assert "comma" in capsys.readouterr().err  # the error lists the valid names
    rc = main(base + ["--out", str(tmp_path / "e2"), "--extras", "probes,ablation", "--probe-tasks", "comma,digit",
                      "--probe-tokens", "2k", "--ablation-positions", "3"])
    assert rc == 0
    r = json.loads((tmp_path / "e2" / "eval.json").read_text())
    assert set(r["extras"]) == {"probes", "ablation"}
    assert [t["task"] for t in r["extras"]["probes"]["tasks"]] == ["comma", "digit"]
    assert r["extras"]["ablation"]["summary"]["n_positions"] == 3
    assert "## Cost" in (tmp_path / "e2" / "report.md").read_text()


def test_report_tables_latent_keyed_dicts_and_cost(tmp_path):
    """N2G and ablation return per-latent data keyed by latent id: it goes to latents.csv, not 1000s of rows."""
    import csv

    from saeforge.eval.report import build_report

    r = {"model": "m", "data": "d", "config": {"context_len": 8, "dense_threshold": 0.1},
         "reconstruction": {"n_tokens": 100, "l0": 8.0, "fvu": 0.1},
         "features": {"d_sae": 64, "dead": 0, "dead_frac": 0.0, "dense": 0, "dense_frac": 0.0},
         "downstream": {"skipped": "no model"}}
    extras = {"s": {"n2g": {"summary": {"precision": 0.7, "recall": 0.3}, "seconds": 1.5, "options": {"n_latents": 300},
                            "latents": {str(j): {"precision": 0.5, "recall": 0.2} for j in range(300)},
                            "explanations": {str(j): {"pattern": "[ the]"} for j in range(300)}}}}
    md = build_report(tmp_path, {"s": r}, {}, {}, extras, seconds={"core": 2.0, "n2g": 1.5}).read_text()
    assert len(md.splitlines()) < 120 and "## Cost" in md and "took 3.5 s" in md
    rows = list(csv.DictReader(open(tmp_path / "latents.csv")))
    assert len(rows) == 600 and rows[0]["latent"] == "0"
