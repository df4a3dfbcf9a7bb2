"""Format readers/writers against checkpoints written by the real peer libraries (../shared/fixtures).

References are independent of saeforge: ``expected.safetensors`` holds what sae_lens, sparsify,
dictionary_learning, sae_lens's Gemma Scope loader and OpenAI's model.py computed for each checkpoint, and the
writer tests compare our files tensor by tensor with the files those libraries wrote.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saeforge.cli import main as cli_main
from saeforge.errors import SaeforgeError
from saeforge.formats import canonical_format, detect_format, hub, load_sae, save_sae_as
from saeforge.sae import create_sae, make_config
from saeforge.sae.batchtopk import batch_topk

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
_INDEX = FIXTURES / "index.json"
CASES = [c["case"] for c in json.loads(_INDEX.read_text())["cases"]] if _INDEX.exists() else []
ATOL = 1e-5
FORMAT_OF = {"sae_lens": "saelens", "sparsify": "sparsify", "dictionary_learning": "dictionary_learning",
             "gemma_scope": "gemma_scope", "openai": "openai"}


@pytest.fixture(autouse=True)
def _need_fixtures(fixtures_dir):  # skips every test when ../shared is absent
    return fixtures_dir


def _case(case: str) -> tuple[Path, torch.Tensor, dict[str, torch.Tensor]]:
    d = FIXTURES / case
    return d, load_file(str(d / "inputs.safetensors"))["x"], load_file(str(d / "expected.safetensors"))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- readers: every fixture case reproduces the library's outputs --------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_reader_reproduces_library_outputs(case):
    d, x, exp = _case(case)
    sae = load_sae(d / "checkpoint")
    lib = case.split("/")[0]
    assert detect_format(d / "checkpoint") == FORMAT_OF[lib]
    assert sae.cfg.metadata["source_format"] == FORMAT_OF[lib]
    with torch.no_grad():
        f = sae.encode(x)
        dec = sae.decode(f)
        fwd = sae(x)
        x_n = sae.normalize_input(x)[0]
        pre = sae.pre_acts(x_n)
    got = {"feature_acts": f, "reconstruction": fwd}
    assert _err(dec + (sae.skip_term(x) if sae.cfg.skip else 0), exp["reconstruction"]) < ATOL
    if "hidden_pre" in exp:
        if case == "sae_lens/topk_rescale":
            # SAELens records h before multiplying by ‖W_dec[j]‖; we folded that factor into W_enc/b_enc,
            # so our pre-activation is h·‖W_dec[j]‖ with the norms of the checkpoint's own decoder.
            norms = load_file(str(d / "checkpoint/sae_weights.safetensors"))["W_dec"].norm(dim=1)
            got["hidden_pre"] = pre / norms
        else:
            got["hidden_pre"] = pre
    if "decode_only" in exp:
        got["decode_only"] = dec
    if lib == "sparsify":
        got["pre_acts"] = pre.relu()  # sparsify returns pre-activations after its ReLU
        vals, idx = sae.encode_sparse(x)
        order = vals.argsort(dim=-1, descending=True)
        got["top_acts"], got["top_indices"] = vals.gather(-1, order), idx.gather(-1, order)
    if case == "dictionary_learning/standard":
        ld = load_sae(d / "checkpoint", normalize_decoder=True)  # what utils.load_dictionary returns
        with torch.no_grad():
            got["feature_acts_load_dictionary"] = ld.encode(x)
            got["reconstruction_load_dictionary"] = ld(x)
    if case == "dictionary_learning/topk":  # informational: encode(x, use_threshold=True)
        thr = sae.cfg.metadata["dictionary_learning_threshold"]
        got["feature_acts_use_threshold"] = pre.relu() * (pre.relu() > thr)
    if case == "dictionary_learning/batchtopk":  # encode(x, use_threshold=False): batch-level top-k
        got["feature_acts_batch_topk"] = batch_topk(pre, sae.cfg.k)
    if case == "sae_lens/batchtopk":  # informational: the training class's batch top-k on the same weights
        k = sae.cfg.metadata["source_config"]["metadata"]["training_architecture_details"]["k"]
        tf = batch_topk(pre, k)
        got["training_feature_acts"], got["training_reconstruction"] = tf, sae.decode(tf)
    assert set(got) == set(exp), f"untested expected tensors: {set(exp) - set(got)}"
    for name, ref in exp.items():
        if ref.dtype == torch.int64:
            assert torch.equal(got[name], ref), name
        else:
            assert _err(got[name], ref) < ATOL, (name, _err(got[name], ref))


# ---- writers: the fixture's own weights written back equal the library's files --------------------------
@pytest.mark.parametrize("case", CASES)
def test_write_back_matches_library_files(case, tmp_path):
    d, x, exp = _case(case)
    fmt = FORMAT_OF[case.split("/")[0]]
    sae = load_sae(d / "checkpoint")
    opts = {"hookpoint": sae.cfg.metadata["sparsify_hookpoint"]} if fmt == "sparsify" else {}
    written = save_sae_as(sae, tmp_path / "out", fmt, **opts)
    meta = json.loads((d / "case.json").read_text())["checkpoint"]["files"]
    for rel in meta:
        old = d / rel
        sub = Path(rel).relative_to("checkpoint")
        if fmt == "dictionary_learning":
            sub = Path(*sub.parts[1:])  # trainer_0/ae.pt -> ae.pt: we write the folder load_dictionary reads
        new = written if written.is_file() else tmp_path / "out" / sub
        assert new.exists(), new
        if old.suffix == ".json":
            a, b = json.loads(old.read_text()), json.loads(new.read_text())
            if case == "sae_lens/topk_rescale":
                assert a.pop("rescale_acts_by_decoder_norm") and not b.pop("rescale_acts_by_decoder_norm")
            assert a == b
            continue
        a, b = _read_tensors(old), _read_tensors(new)
        assert set(a) == set(b)
        for key, va in a.items():
            vb = b[key]
            if not isinstance(va, torch.Tensor):
                assert va == vb, key
                continue
            assert va.shape == vb.shape and va.dtype == vb.dtype, key
            if fmt == "openai" and key.startswith(("stats_", "latents_")):
                continue  # training statistics: dropped on read, written at model.py's initial values
            if case == "sae_lens/topk_rescale":
                continue  # decoder norms folded into the encoder: checked through the outputs below
            assert torch.equal(va, vb), (key, _err(va, vb))
    if case == "sae_lens/topk_rescale":
        w = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
        assert torch.allclose(w["W_dec"].norm(dim=1), torch.ones(256), atol=1e-6)
    back = load_sae(written)
    with torch.no_grad():
        assert _err(back.encode(x), exp["feature_acts"]) < ATOL
        assert _err(back(x), exp["reconstruction"]) < ATOL


# ---- writers: fresh saeforge SAEs round-trip and match the peers' schema ---------------------------------
def _random_sae(arch: str, d_out: int | None = None, seed: int = 0, **kw):
    cfg = make_config(arch, d_in=64, d_sae=256, d_out=d_out, **kw)
    sae = create_sae(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else 0.15))
        sae.W_dec.mul_(torch.rand(256, 1, generator=g) * 1.7 + 0.3)  # non-unit, non-uniform decoder norms
        if arch == "jumprelu":
            sae.log_threshold.copy_((torch.rand(256, generator=g) * 0.25 + 0.05).log())
        if arch == "batchtopk":
            sae.threshold.fill_(0.15)
    return sae.eval()


def _inputs(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=g)
    return x * (torch.rand(32, 1, generator=g) * 2.5 + 0.5) + (torch.rand(32, 1, generator=g) * 2 - 1)


def _outputs(sae, x):
    with torch.no_grad():
        f = sae.encode(x)
        return f, sae.decode(f), sae(x)


TC = {"hook": "blocks.0.ln2.hook_normalized", "target_hook": "blocks.0.hook_mlp_out"}
SPARSIFY_TC = {"hook": "layers.0.mlp:in", "target_hook": "layers.0.mlp"}
ROUND_TRIPS = [  # (arch, format, config kwargs, fixture whose file layout the output must have)
    ("relu", "saelens", {"apply_b_dec_to_input": True}, "sae_lens/standard"),
    ("relu", "saelens", {"apply_b_dec_to_input": True, "input_norm": "layer_norm"}, "sae_lens/standard_layer_norm"),
    ("relu", "saelens", {"input_norm": "constant_norm_rescale"}, "sae_lens/standard"),
    ("topk", "saelens", {"k": 8}, "sae_lens/topk"),
    ("jumprelu", "saelens", {"apply_b_dec_to_input": True}, "sae_lens/jumprelu"),
    ("gated", "saelens", {}, "sae_lens/gated"),
    ("batchtopk", "saelens", {"k": 8}, "sae_lens/batchtopk"),
    ("relu", "saelens", {"apply_b_dec_to_input": False, **TC}, "sae_lens/transcoder"),
    ("jumprelu", "saelens", {"d_out": 48, "skip": True, **TC}, "sae_lens/jumprelu_skip_transcoder"),
    ("topk", "sparsify", {"k": 8}, "sparsify/topk"),
    ("topk", "sparsify", {"k": 8, "skip": True, "apply_b_dec_to_input": False, **SPARSIFY_TC},
     "sparsify/transcoder_skip"),
    ("relu", "dictionary_learning", {"apply_b_dec_to_input": True}, "dictionary_learning/standard"),
    ("topk", "dictionary_learning", {"k": 8}, "dictionary_learning/topk"),
    ("batchtopk", "dictionary_learning", {"k": 8}, "dictionary_learning/batchtopk"),
    ("jumprelu", "dictionary_learning", {}, "dictionary_learning/jumprelu"),
    ("gated", "dictionary_learning", {}, "dictionary_learning/gated"),
    ("jumprelu", "gemma_scope", {}, "gemma_scope/jumprelu"),
    ("topk", "openai", {"k": 8, "input_norm": "layer_norm"}, "openai/topk"),
    # conventions the target lacks, converted exactly (no layout check)
    ("relu", "dictionary_learning", {"apply_b_dec_to_input": False, "input_scale": 2.5, "output_scale": 2.5}, None),
    ("gated", "dictionary_learning", {"apply_b_dec_to_input": False, "input_scale": 0.7, "output_scale": 0.7}, None),
    ("topk", "sparsify", {"k": 8, "input_scale": 1.7, "output_scale": 1.7}, None),
    ("jumprelu", "gemma_scope", {"apply_b_dec_to_input": True, "input_scale": 3.0, "output_scale": 3.0}, None),
    ("relu", "saelens", {"d_out": 48, "input_scale": 2.0, "output_scale": 0.5, **TC}, None),
    ("jumprelu", "saelens", {"apply_b_dec_to_input": True, "skip": True}, None),
    ("topk", "openai", {"k": 8, "input_norm": "layer_norm", "apply_b_dec_to_input": False, "input_scale": 1.3,
                        "output_scale": 1.3}, None),
    ("batchtopk", "gemma_scope", {"k": 8}, None),
    *[(a, "saeforge", kw, None) for a, kw in [("relu", {}), ("topk", {"k": 8}), ("jumprelu", {"d_out": 48, **TC}),
                                             ("gated", {}), ("batchtopk", {"k": 8})]],
]


def _layout(root: Path) -> dict[str, dict]:
    """Relative file -> {tensor name: (shape, dtype)} or {json key: nested keys} for a checkpoint tree."""
    out: dict[str, dict] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.name if p.suffix in (".pt", ".npz") else str(p.relative_to(root))
        if p.suffix == ".json":
            d = json.loads(p.read_text())
            out[rel] = {k: sorted(v) if isinstance(v, dict) and k in ("trainer", "buffer", "sae") else None
                       for k, v in d.items()}
        else:
            t = _read_tensors(p)
            out[rel] = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v) for k, v in t.items()}
    return out


@pytest.mark.parametrize("arch,fmt,kw,fixture", ROUND_TRIPS,
                         ids=[f"{a}-{f}-{i}" for i, (a, f, _, _) in enumerate(ROUND_TRIPS)])
def test_round_trip(arch, fmt, kw, fixture, tmp_path):
    kw = dict(kw)
    sae = _random_sae(arch, d_out=kw.pop("d_out", None), **kw)
    x = _inputs()
    hookpoint = "layers.0.mlp" if fixture == "sparsify/transcoder_skip" else "layers.0" if fmt == "sparsify" else None
    written = save_sae_as(sae, tmp_path / "out", fmt, **({"hookpoint": hookpoint} if hookpoint else {}))
    back = load_sae(written)
    for a, b in zip(_outputs(sae, x), _outputs(back, x)):
        # float32 rounding of the folds scales with the outputs (up to ~20 here): relative tolerance
        assert _err(a, b) < ATOL * max(1.0, a.abs().max().item())
    if fixture is not None:
        ref_root = FIXTURES / fixture / "checkpoint"
        if fmt == "dictionary_learning":
            ref_root = ref_root / "trainer_0"
        assert _layout(tmp_path / "out") == _layout(ref_root)
    if fmt == "saelens" and fixture is not None:
        ref_meta = json.loads((FIXTURES / fixture / "checkpoint/cfg.json").read_text())["metadata"]
        new_meta = json.loads((tmp_path / "out/cfg.json").read_text())["metadata"]
        assert set(ref_meta) <= set(new_meta)


def test_writers_never_fold_decoder_norms(tmp_path):
    """Conversions keep every code value (a peer's feature activations stay the same numbers)."""
    sae = _random_sae("relu", apply_b_dec_to_input=True)
    save_sae_as(sae, tmp_path / "n", "saeforge")
    back = load_sae(tmp_path / "n")
    assert torch.equal(back.W_dec, sae.W_dec) and torch.equal(back.W_enc, sae.W_enc)


# ---- errors name the problem ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch,fmt,kw,words", [
    ("gated", "sparsify", {}, ["sparsify", "gated"]),
    ("relu", "gemma_scope", {}, ["gemma_scope", "relu"]),
    ("topk", "openai", {"k": 8}, ["openai", "layer_norm"]),
    ("jumprelu", "dictionary_learning", {"skip": True}, ["dictionary_learning", "skip"]),
    ("topk", "saelens", {"k": 8, "d_out": 48, "apply_b_dec_to_input": False, **TC}, ["saelens", "transcoder"]),
    ("relu", "sparsify", {"input_norm": "layer_norm"}, ["sparsify", "relu"]),
    ("topk", "dictionary_learning", {"k": 8, "input_norm": "layer_norm"}, ["dictionary_learning", "input_norm"]),
])
def test_unrepresentable_targets_are_errors(arch, fmt, kw, words, tmp_path):
    kw = dict(kw)
    sae = _random_sae(arch, d_out=kw.pop("d_out", None), **kw)
    with pytest.raises(SaeforgeError) as err:
        save_sae_as(sae, tmp_path / "x", fmt)
    for w in words:
        assert w in str(err.value)
    assert "\n" not in str(err.value)


def test_non_positive_thresholds_load(tmp_path):  # exactly ReLU latents (tests/test_format_fixes.py)
    src = FIXTURES / "sae_lens/jumprelu/checkpoint"
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    w = load_file(str(dst / "sae_weights.safetensors"))
    w["threshold"][:3] = 0.0
    w["threshold"][3] = -0.5
    save_file(w, str(dst / "sae_weights.safetensors"))
    assert torch.equal(load_sae(dst).threshold[:4], torch.zeros(4))


def test_sparsify_run_folder_needs_a_hookpoint(tmp_path):
    src = FIXTURES / "sparsify/topk/checkpoint"
    run = tmp_path / "run"
    for hp in ("layers.0", "layers.1"):
        shutil.copytree(src / "layers.0", run / hp)
    shutil.copy(src / "config.json", run / "config.json")
    with pytest.raises(SaeforgeError, match=r"layers\.0, layers\.1"):
        load_sae(run)
    with pytest.raises(SaeforgeError, match="no hook point 'layers.7'"):
        load_sae(run, hookpoint="layers.7")
    sae = load_sae(run, hookpoint="layers.1")
    assert sae.cfg.hook == "layers.1"
    _, x, exp = _case("sparsify/topk")
    assert _err(sae.encode(x), exp["feature_acts"]) < ATOL


@pytest.mark.parametrize("edit,words", [
    ({"normalize_activations": "covariance_whitening"}, ["covariance_whitening"]),
    ({"architecture": "matryoshka_temporal"}, ["matryoshka_temporal"]),
])
def test_saelens_unknown_settings_are_named(edit, words, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(FIXTURES / "sae_lens/standard/checkpoint", dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg.update(edit)
    (dst / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeforgeError) as err:
        load_sae(dst)
    assert all(w in str(err.value) for w in words)


def test_sparsify_groupmax_is_an_error(tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(FIXTURES / "sparsify/topk/checkpoint/layers.0", dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg["activation"] = "groupmax"
    (dst / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeforgeError, match="groupmax"):
        load_sae(dst)


def test_openai_state_dict_with_activation_keys_loads(tmp_path):
    """``Autoencoder.state_dict()`` itself adds activation.k / activation.postact_fn; they are ignored."""
    sd = torch.load(FIXTURES / "openai/topk/checkpoint/0.pt", weights_only=True)
    sd["activation.k"], sd["activation.postact_fn"] = 8, "ReLU"
    torch.save(sd, tmp_path / "5.pt")
    _, x, exp = _case("openai/topk")
    sae = load_sae(tmp_path / "5.pt")
    assert _err(sae.encode(x), exp["feature_acts"]) < ATOL
    assert _err(sae(x), exp["reconstruction"]) < ATOL


def test_unknown_format_and_folder_are_errors(tmp_path):
    with pytest.raises(SaeforgeError, match="unknown SAE format"):
        canonical_format("keras")
    assert canonical_format("SAE-Lens") == "saelens"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeforgeError, match="cannot tell the SAE format"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SaeforgeError, match="does not exist"):
        load_sae(tmp_path / "missing")


# ---- hub and CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local 'repo' laid out like google/gemma-scope: <repo>/layer_0/width_256/params.npz."""
    repo = tmp_path / "hub_repo"
    (repo / "layer_0/width_256").mkdir(parents=True)
    shutil.copy(FIXTURES / "gemma_scope/jumprelu/checkpoint/params.npz", repo / "layer_0/width_256/params.npz")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(repo)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    return calls


def test_load_from_hub_id(fake_hub):
    _, x, exp = _case("gemma_scope/jumprelu")
    sae = load_sae("google/gemma-scope-test", subfolder="layer_0/width_256", revision="v1")
    assert fake_hub == [{"repo_id": "google/gemma-scope-test", "revision": "v1",
                         "allow_patterns": ["layer_0/width_256/*"]}]
    assert sae.cfg.metadata["source_hub"]["id"] == "google/gemma-scope-test"
    assert _err(sae.encode(x), exp["feature_acts"]) < ATOL
    sae2 = load_sae("google/gemma-scope-test/layer_0/width_256")  # sub-folder inside the id
    assert fake_hub[-1]["allow_patterns"] == ["layer_0/width_256/*"]
    assert torch.equal(sae2.W_enc, sae.W_enc)


def test_cli_convert_local_and_hub(fake_hub, tmp_path, capsys):
    d, x, exp = _case("dictionary_learning/gated")
    assert cli_main(["convert", str(d / "checkpoint"), str(tmp_path / "sl"), "--to", "sae-lens"]) == 0
    sae = load_sae(tmp_path / "sl")
    assert _err(sae.encode(x), exp["feature_acts"]) < ATOL and _err(sae(x), exp["reconstruction"]) < ATOL
    assert cli_main(["convert", "google/gemma-scope-test", str(tmp_path / "dl"), "--to", "dictionary_learning",
                     "--subfolder", "layer_0/width_256"]) == 0
    _, x, exp = _case("gemma_scope/jumprelu")
    assert _err(load_sae(tmp_path / "dl").encode(x), exp["feature_acts"]) < ATOL
    assert "converted" in capsys.readouterr().out
    assert cli_main(["convert", str(d / "checkpoint"), str(tmp_path / "sp"), "--to", "sparsify"]) == 2
    assert "sparsify" in capsys.readouterr().err
