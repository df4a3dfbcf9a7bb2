"""Formats read what each SAE class declares about itself (``SAE.export_spec``), not its architecture name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from saeforge.errors import SaeforgeError
from saeforge.formats import save_sae_as
from saeforge.sae import architectures, create_sae, make_config
from saeforge.sae.base import ExportSpec

FORMATS_DIR = Path(__file__).resolve().parents[1] / "saeforge" / "formats"
_KW = {"topk": {"k": 8}, "batchtopk": {"k": 8}, "matryoshka": {"k": 8}, "crosscoder": {"hooks": ["a", "b"]}}


def test_formats_never_branch_on_the_architecture_name():
    pattern = re.compile(r"\b(cfg\.)?arch\s*(==|!=|\bin\b|\bnot in\b)")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(FORMATS_DIR.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_every_architecture_declares_a_valid_spec_or_none(arch):
    sae = create_sae(make_config(arch, d_in=64, d_sae=256, **_KW.get(arch, {})))
    spec = sae.export_spec()
    if spec is None:
        return
    assert isinstance(spec, ExportSpec) and spec.activation in ExportSpec.ACTIVATIONS
    state = sae.state_dict()
    for bias, scale in spec.encoder_biases:
        assert bias in state and (scale is None or scale in state)
    for name, t in spec.tensors.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad, name
    if spec.activation in ("topk", "batchtopk"):
        assert spec.k == sae.cfg.k
    if spec.groups is not None:
        assert sum(spec.groups) == sae.cfg.d_sae


@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai"])
def test_an_architecture_without_a_spec_is_one_line(fmt, tmp_path):
    sae = create_sae(make_config("crosscoder", d_in=64, d_sae=256, hooks=["a", "b"]))
    assert sae.export_spec() is None
    with pytest.raises(SaeforgeError) as err:
        save_sae_as(sae, tmp_path / "x", fmt)
    msg = str(err.value)
    assert "crosscoder" in msg and fmt in msg and "\n" not in msg
