"""Llama Scope checkpoints (fnlp/Llama3_1-8B-Base-L*): read from a folder in their layout, by release name from
a Hub-layout cache offline, and against SAELens's own loader where sae_lens is installed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saeforge.errors import SaeforgeError
from saeforge.formats import detect_format, load_sae
from saeforge.releases import resolve

from test_releases import _offline, _put  # the Hub-layout cache helpers

D, M, THETA, NORM_IN = 16, 64, 0.4, 7.5


def _folder(root: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Llama Scope folder: hyperparams.json + checkpoints/final.safetensors, random weights."""
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": torch.randn(M, D, generator=g) / 4, "encoder.bias": torch.randn(M, generator=g) / 4,
         "decoder.weight": torch.randn(D, M, generator=g) / 4, "decoder.bias": torch.randn(D, generator=g)}
    (root / "checkpoints").mkdir(parents=True)
    save_file(w, str(root / "checkpoints" / "final.safetensors"))
    cfg = {"d_model": D, "d_sae": M, "jump_relu_threshold": THETA, "hook_point_in": "blocks.15.hook_resid_post",
           "hook_point_out": "blocks.15.hook_resid_post", "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_IN}}
    (root / "hyperparams.json").write_text(json.dumps(cfg))
    return root, w


def _by_hand(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = math.sqrt(D) / NORM_IN
    h = (s * x) @ w["encoder.weight"].T + w["encoder.bias"]
    f = h * (h > THETA * s)
    return f, (f @ w["decoder.weight"].T + w["decoder.bias"]) / s  # the "out" norm equals the "in" one here


def test_a_llama_scope_folder_reads_as_the_formula(tmp_path):
    path, w = _folder(tmp_path / "Llama3_1-8B-Base-L15R-8x")
    assert detect_format(path) == "llama_scope"
    sae = load_sae(path)
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(5)) * 3
    f, x_hat = _by_hand(w, x)
    assert (f != 0).any() and (f == 0).any()
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f, atol=1e-5)
        assert torch.allclose(sae(x), x_hat, atol=1e-4)
    assert sae.cfg.hook == "resid_post.15" and sae.cfg.metadata["source_format"] == "llama_scope"


def test_llama_scope_is_read_only_and_a_bad_config_is_one_line(tmp_path):
    path, _ = _folder(tmp_path / "ls")
    with pytest.raises(SaeforgeError, match="read-only"):
        from saeforge.formats import save_sae_as
        save_sae_as(load_sae(path), tmp_path / "out", "llama_scope")
    (path / "hyperparams.json").write_text(json.dumps({"d_model": D, "d_sae": M}))
    with pytest.raises(SaeforgeError, match="not a Llama Scope hyperparams.json"):
        load_sae(path, format="llama_scope")


def test_llama_scope_release_ids_load_offline(tmp_path):
    rel = resolve("llama_scope_lxr_8x", "l15r_8x")
    assert (rel.repo_id, rel.path, rel.hook) == ("fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x",
                                                "resid_post.15")
    src, w = _folder(tmp_path / "src")
    cache = tmp_path / "hub"
    for name in ("hyperparams.json", "checkpoints/final.safetensors"):
        _put(cache, rel.repo_id, f"{rel.path}/{name}", src / name)
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(6))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    res = _offline(tmp_path, cache, r"""
import json
from safetensors.torch import load_file
from saeforge import load_sae
sae = load_sae("llama_scope_lxr_8x/l15r_8x")
x = load_file("x.safetensors")["x"]
print(json.dumps({"codes": sae.encode(x).tolist(), "hook": sae.cfg.hook, "model": sae.cfg.model}))
""")
    f, _ = _by_hand(w, x)
    assert torch.allclose(torch.tensor(res["codes"]), f, atol=1e-5)
    assert res["hook"] == "resid_post.15" and res["model"] == "meta-llama/Llama-3.1-8B"


def test_llama_scope_matches_saelens_loader(tmp_path, monkeypatch):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE as SLSAE
    from sae_lens.loading import pretrained_sae_loaders as L

    path, _ = _folder(tmp_path / "Llama3_1-8B-Base-L15R-8x")
    monkeypatch.setattr(L, "hf_hub_download",
                        lambda repo_id, filename, subfolder=None, **kw: str(tmp_path / (f"{subfolder}/{filename}"
                                                                                        if subfolder else filename)))
    # float32 (its default loads Llama Scope in bfloat16)
    cfg, state, _ = L.llama_scope_sae_huggingface_loader("fnlp/x", path.name, device="cpu",
                                                         cfg_overrides={"dtype": "float32"})
    sl = SLSAE.from_dict(cfg)
    sl.load_state_dict(state, strict=False)
    sl.fold_activation_norm_scaling_factor(math.sqrt(D) / NORM_IN)
    ours = load_sae(path)
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), sl.encode(x), atol=1e-5)
        assert torch.allclose(ours(x), sl.decode(sl.encode(x)), atol=1e-4)


@pytest.mark.parametrize("damage", ["cut_weights", "nan_threshold", "width_mismatch", "zero_norm"])
def test_a_damaged_llama_scope_folder_is_one_line(tmp_path, capsys, damage):
    from saeforge.cli import main

    path, _ = _folder(tmp_path / "ls")
    cfg = json.loads((path / "hyperparams.json").read_text())
    if damage == "cut_weights":
        f = path / "checkpoints" / "final.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    else:
        cfg.update({"nan_threshold": {"jump_relu_threshold": float("nan")}, "width_mismatch": {"d_model": 8},
                    "zero_norm": {"dataset_average_activation_norm": {"in": 0.0}}}[damage])
        (path / "hyperparams.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    rc = main(["convert", str(path), str(tmp_path / "out"), "--to", "saeforge"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "error:" in err[0], err
