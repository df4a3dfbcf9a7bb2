"""The evaluation report opens with one summary row per SAE; per-latent data goes to latents.csv."""
from __future__ import annotations

import csv

from saeforge.eval.report import build_report


def _result(i: int) -> dict:
    return {"model": "m", "data": "d", "config": {"context_len": 8, "dense_threshold": 0.1},
            "reconstruction": {"n_tokens": 100, "l0": 8.0 + i, "fvu": 0.1 * (i + 1)},
            "features": {"d_sae": 64, "dead": i, "dead_frac": i / 64, "dense": 0, "dense_frac": 0.0},
            "downstream": {"skipped": "no model"}}


def test_summary_first_and_latents_to_csv(tmp_path):
    results = {f"sae{i}": _result(i) for i in range(8)}
    extras = {name: {"n2g": {"summary": {"precision": 0.7, "recall": 0.3},
                             "latents": [{"latent": j, "precision": 0.5, "pattern": "the"} for j in range(300)]},
                     "probes": {"summary": {"probe_loss": 0.42}, "tasks": [{"task": "t", "loss": 0.4}]},
                     "ablation": {"summary": {"ablation_sparsity": 0.18},
                                  "per_latent": [{"latent": j, "sparsity": 0.1} for j in range(300)]}}
              for name in results}
    md = build_report(tmp_path, results, {}, {}, extras).read_text().splitlines()
    assert md[2] == "## Summary"
    header = next(line for line in md if line.startswith("| sae |"))
    for col in ("l0", "fvu", "dead", "probe_loss", "n2g_prec", "n2g_rec", "abl_sparsity"):
        assert f" {col} " in header, col
    assert md.index(header) < 10  # the first screen
    assert len(md) < 400  # 8 SAEs x 600 per-latent rows stay out of the report
    rows = list(csv.DictReader(open(tmp_path / "latents.csv")))
    assert len(rows) == 8 * 600 and {"section", "latent"} <= set(rows[0])
    assert "latents.csv" in "\n".join(md) and "| t | 0.4000 |" in "\n".join(md)  # short tables stay inline
