"""``release/sae_id`` (SAELens release names) resolved through huggingface_hub's cache, offline.

The test lays out a Hub cache exactly as huggingface_hub does (``models--org--name/refs/main``, ``blobs/<sha256>``,
``snapshots/<commit>/<folder>/<file>`` symlinked to the blob) with small fixture SAEs in each release's real
folder layout, then loads them with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set in a fresh process (the
variables are read when huggingface_hub is imported), through the Python API and the CLI.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeforge.errors import SaeforgeError
from saeforge.formats import load_sae
from saeforge.releases import registry, resolve

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _put(cache: Path, repo_id: str, rel_file: str, src: Path) -> None:
    """One file in a Hub-layout cache: the blob named by its sha256, a snapshot symlink to it, refs/main."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    data = src.read_bytes()
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "snapshots" / COMMIT / rel_file
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def hub_cache(tmp_path, fixtures_dir):
    cache = tmp_path / "hub"
    gs = fixtures_dir / "gemma_scope/jumprelu/checkpoint/params.npz"
    for folder in ("layer_20/width_16k/average_l0_71", "embedding/width_4k/average_l0_6"):
        _put(cache, "google/gemma-scope-2b-pt-res", f"{folder}/params.npz", gs)
    sl = fixtures_dir / "sae_lens/topk/checkpoint"
    for name in ("cfg.json", "sae_weights.safetensors"):  # the v5 32k folders end in .pt on the Hub
        _put(cache, "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs", f"v5_32k_layer_3.pt/{name}", sl / name)
    return cache


def _offline(tmp_path: Path, cache: Path, code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


CODE = r"""
import json, torch
from safetensors.torch import load_file
from saeforge import load_sae
from saeforge.cli import main
res = {}
x = load_file(X_GS)["x"]
sae = load_sae("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
res["gs"] = {"codes": sae.encode(x).tolist(), "hook": sae.cfg.hook, "model": sae.cfg.model,
             "release": sae.cfg.metadata["source_release"]}
canon = load_sae("gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical")
res["canonical_same"] = bool(torch.equal(canon.W_enc, sae.W_enc))
emb = load_sae("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6")
res["emb"] = {"scale": emb.cfg.metadata.get("gemma_scope_embedding_scale"), "hook": emb.cfg.hook}
x2 = load_file(X_SL)["x"]
v5 = load_sae("gpt2-small-resid-post-v5-32k/blocks.3.hook_resid_post")
res["v5"] = {"codes": v5.encode(x2).tolist(), "hook": v5.cfg.hook}
res["cli"] = main(["convert", "gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71", "converted", "--to", "saeforge"])
try:
    load_sae("gemma-scope-2b-pt-res/layer_21/width_16k/average_l0_70")  # not in the cache, offline
except Exception as e:
    res["missing"] = [type(e).__name__, str(e)]
print(json.dumps(res))
"""


def test_release_ids_load_offline_from_the_hub_cache(hub_cache, tmp_path, fixtures_dir):
    gs_case, sl_case = fixtures_dir / "gemma_scope/jumprelu", fixtures_dir / "sae_lens/topk"
    code = CODE.replace("X_GS", repr(str(gs_case / "inputs.safetensors"))).replace(
        "X_SL", repr(str(sl_case / "inputs.safetensors")))
    res = _offline(tmp_path, hub_cache, code)
    exp = load_file(str(gs_case / "expected.safetensors"))["feature_acts"]
    assert (torch.tensor(res["gs"]["codes"]) - exp).abs().max() < 1e-5
    assert res["gs"]["hook"] == "resid_post.20" and res["gs"]["model"] == "google/gemma-2-2b"
    assert res["gs"]["release"]["repo_id"] == "google/gemma-scope-2b-pt-res"
    assert res["canonical_same"]  # canonical layer_20/width_16k is average_l0_71
    assert res["emb"] == {"scale": pytest.approx(8.0), "hook": "embed"}  # √64, found through the snapshot symlink
    exp2 = load_file(str(sl_case / "expected.safetensors"))["feature_acts"]
    assert (torch.tensor(res["v5"]["codes"]) - exp2).abs().max() < 1e-5
    assert res["v5"]["hook"] == "resid_post.0"  # the file's own hook wins over the release's
    assert res["cli"] == 0 and (tmp_path / "converted" / "cfg.json").exists()
    kind, msg = res["missing"]
    assert kind == "SaeforgeError" and "layer_21" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_unknown_release_names_close_matches():
    with pytest.raises(SaeforgeError, match=r"gemma-scope-2b-pt-res") as err:
        load_sae("gemma-scope-2b-pt-rez/layer_20/width_16k/average_l0_71")
    assert "\n" not in str(err.value)
    with pytest.raises(SaeforgeError, match="close: blocks.11.hook_resid_post"):
        resolve("gpt2-small-res-jb", "blocks.11.hook_resid_pst")
    with pytest.raises(SaeforgeError, match="ids look like"):
        resolve("gemma-scope-9b-pt-mlp", "layer_3/width_16k")


def test_registry_covers_the_main_releases():
    reg = registry()
    for name in ("gemma-scope-2b-pt-res", "gemma-scope-2b-pt-mlp", "gemma-scope-2b-pt-att",
                 "gemma-scope-9b-pt-res", "gemma-scope-2b-pt-res-canonical", "gemma-scope-9b-pt-res-canonical",
                 "gpt2-small-res-jb", "gpt2-small-resid-post-v5-32k", "gpt2-small-resid-post-v5-128k"):
        assert name in reg, name
    assert resolve("gpt2-small-resid-post-v5-128k", "blocks.5.hook_resid_post").path == "v5_128k_layer_5"
    assert resolve("gemma-scope-2b-pt-mlp", "layer_3/width_65k/average_l0_40").hook == "mlp_out.3"
