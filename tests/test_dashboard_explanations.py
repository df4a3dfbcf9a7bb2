"""``dashboard build --explanations`` reads what ``saeforge eval --all`` writes, as written."""
from __future__ import annotations

import json

import pytest

from saeforge.dashboard import load_explanations
from saeforge.errors import SaeforgeError

N2G = {"summary": {"precision": 0.7}, "latents": [],
       "explanations": {"3": {"pattern": "kiss", "precision": 0.9, "recall": 0.4, "f1": 0.55}, "7": "the"}}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_reads_one_sae_eval_json(tmp_path):
    got = load_explanations(_write(tmp_path / "eval.json", {"reconstruction": {}, "extras": {"n2g": N2G}}))
    assert got == {3: {"pattern": "kiss", "precision": 0.9, "recall": 0.4, "f1": 0.55}, 7: {"pattern": "the"}}


def test_reads_a_sweep_eval_json_by_name(tmp_path):
    combined = {"saes": {"a": {"extras": {"n2g": N2G}}, "b": {"extras": {}}}, "frontier": []}
    p = _write(tmp_path / "eval.json", combined)
    assert load_explanations(p, sae_name="a")[3]["pattern"] == "kiss"
    with pytest.raises(SaeforgeError, match="2 SAEs"):
        load_explanations(p)
    single = _write(tmp_path / "one.json", {"saes": {"a": {"extras": {"n2g": N2G}}}})
    assert 7 in load_explanations(single)


def test_bare_table_and_missing_n2g(tmp_path):
    assert load_explanations(_write(tmp_path / "n2g.json", N2G))[7] == {"pattern": "the"}
    with pytest.raises(SaeforgeError, match="no N2G explanations"):
        load_explanations(_write(tmp_path / "plain.json", {"reconstruction": {"fvu": 0.1}}))
    with pytest.raises(SaeforgeError, match="N2G failed"):
        load_explanations(_write(tmp_path / "err.json", {"extras": {"n2g": {"error": "ValueError: too few"}}}))
