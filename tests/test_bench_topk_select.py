"""benchmarks/topk_select.py: one JSON line per shape, with the exactness check it reports."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import topk_select  # noqa: E402


def test_prints_one_line_per_shape_with_equal_values(capsys):
    topk_select.main(["--shapes", "16x4096x32", "8x1024x8", "--repeats", "1"])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [(r["m"], r["k"], r["group"]) for r in lines] == [(4096, 32, 32), (1024, 8, 32)]
    assert all(r["same_values"] and r["speedup"] > 0 for r in lines)


def test_a_malformed_shape_is_one_line(capsys):
    with pytest.raises(SystemExit):
        topk_select.main(["--shapes", "4096x32"])
    assert "is not BxMxK" in capsys.readouterr().err
