"""`saeforge eval` on imported SAEs: a peer-library checkpoint placed on a model of matching width (d = 64)."""
from __future__ import annotations

import math

import pytest

from saeforge.eval import evaluate
from saeforge.formats import load_sae
from saeforge.models import load_model


@pytest.mark.parametrize("case", ["sae_lens/topk", "sparsify/topk", "gemma_scope/jumprelu", "openai/topk"])
def test_eval_runs_on_imported_sae(case, fixtures_dir, stories_model_path, tinystories_valid, tmp_path):
    ckpt = fixtures_dir / case / "checkpoint"
    sae = load_sae(ckpt, hookpoint="layers.0") if case.startswith("sparsify") else load_sae(ckpt)
    sae.cfg.hook = "resid_post.2"  # the fixtures were made for another model; widths match (64)
    model = load_model(str(stories_model_path))
    res = evaluate(sae, model, str(tinystories_valid), n_tokens=500, out=tmp_path / "ev", progress=False)
    text = repr(res)
    assert "fvu" in text and "ce_recovered" in text
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                flat[prefix + k] = v

    walk(res)
    fvu = [v for k, v in flat.items() if k.endswith("fvu") and isinstance(v, float)]
    ce = [v for k, v in flat.items() if k.endswith("ce_clean") and isinstance(v, float)]
    assert fvu and all(math.isfinite(v) and v > 0 for v in fvu)  # a random SAE on foreign data: lossy
    assert ce and all(1.0 < v < 3.0 for v in ce)
    assert (tmp_path / "ev" / "eval.json").exists()
