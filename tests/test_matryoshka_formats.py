"""Matryoshka BatchTopK SAEs in dictionary_learning's and SAELens's layouts.

* dictionary_learning has a ``MatryoshkaBatchTopKSAE`` class (``ae.pt`` with ``group_sizes``; ``config.json``
  from ``MatryoshkaBatchTopKTrainer.config``): saeforge writes it, reads it, and the real library's
  ``load_dictionary`` / a real instance agree with saeforge to 1e-5.
* SAELens saves Matryoshka BatchTopK SAEs for inference as ``jumprelu`` (one threshold broadcast over the
  latents; ``metadata.training_architecture = "matryoshka_batchtopk"``): saeforge writes that, and SAELens's
  own ``SAE.load_from_disk`` reproduces saeforge's codes and reconstructions.

Tests that need the peer libraries skip when they are not importable (they live in the peers venv).
"""
from __future__ import annotations

import json

import pytest
import torch

from saeforge.formats import load_sae, save_sae_as
from saeforge.sae import create_sae, make_config

D_IN, D_SAE, K = 64, 256, 8
FRACTIONS = [0.125, 0.25, 0.625]
ATOL = 1e-5


def _matryoshka(seed: int = 0, **kw):
    cfg = make_config("matryoshka", d_in=D_IN, d_sae=D_SAE, k=K, group_fractions=FRACTIONS, hook="resid_post.0",
                      model="tiny", **kw)
    sae = create_sae(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else 0.15))
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) * 1.7 + 0.3)
        sae.threshold.fill_(0.15)
    return sae.eval()


def _x(seed: int = 5) -> torch.Tensor:
    return torch.randn(32, D_IN, generator=torch.Generator().manual_seed(seed))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


# ---- without the peers: saeforge's own round trips ------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"apply_b_dec_to_input": False, "input_scale": 1.5, "output_scale": 1.5}])
def test_dictionary_learning_round_trip_keeps_the_groups(kw, tmp_path):
    sae = _matryoshka(**kw)
    out = save_sae_as(sae, tmp_path / "dl", "dictionary_learning")
    sd = torch.load(out / "ae.pt", weights_only=True)
    assert sorted(sd) == sorted(["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"])
    assert sd["group_sizes"].tolist() == sae.cfg.group_sizes and sd["group_sizes"].dtype == torch.int64
    assert sd["k"].dtype == torch.int32 and sd["threshold"].shape == ()
    tr = json.loads((out / "config.json").read_text())["trainer"]
    assert tr["dict_class"] == "MatryoshkaBatchTopKSAE" and tr["group_sizes"] == sae.cfg.group_sizes
    back = load_sae(out)
    assert back.cfg.arch == "matryoshka" and back.cfg.group_sizes == sae.cfg.group_sizes
    assert back.cfg.group_weights == pytest.approx(sae.cfg.group_weights)
    x = _x()
    with torch.no_grad():
        assert _err(back.encode(x), sae.encode(x)) < ATOL and _err(back(x), sae(x)) < ATOL


def test_saelens_export_is_jumprelu_with_the_matryoshka_widths(tmp_path):
    sae = _matryoshka()
    out = save_sae_as(sae, tmp_path / "sl", "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    meta = cfg["metadata"]
    assert meta["training_architecture"] == "matryoshka_batchtopk"
    assert meta["training_architecture_details"]["matryoshka_widths"] == [32, 96, 256]
    back = load_sae(out)  # what SAELens loads: a JumpReLU SAE
    x = _x()
    with torch.no_grad():
        assert _err(back.encode(x), sae.encode(x)) < ATOL and _err(back(x), sae(x)) < ATOL


# ---- against the real libraries ------------------------------------------------------------------------
def test_dictionary_learning_reads_what_saeforge_writes(tmp_path):
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.utils import load_dictionary

    sae = _matryoshka()
    out = save_sae_as(sae, tmp_path / "dl", "dictionary_learning")
    ae, config = load_dictionary(str(out), device="cpu")
    assert type(ae).__name__ == "MatryoshkaBatchTopKSAE"
    x = _x()
    with torch.no_grad():
        assert _err(ae.encode(x), sae.encode(x)) < ATOL
        assert _err(ae(x), sae(x)) < ATOL
    # the files have the real class's state-dict layout and the real trainer's config keys
    ref = MatryoshkaBatchTopKTrainer(steps=10_000, activation_dim=D_IN, dict_size=D_SAE, k=K, layer=0,
                                     lm_name="tiny", group_fractions=FRACTIONS, device="cpu", seed=0,
                                     submodule_name="resid_post.0")
    mine = torch.load(out / "ae.pt", weights_only=True)
    theirs = ref.ae.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert list(config["trainer"]) == list(ref.config)
    for key in ("group_sizes", "group_fractions", "group_weights", "k", "activation_dim", "dict_size"):
        assert config["trainer"][key] == pytest.approx(ref.config[key]), key


def test_saeforge_reads_a_real_dictionary_learning_matryoshka(tmp_path):
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    torch.manual_seed(0)
    tr = MatryoshkaBatchTopKTrainer(steps=10_000, activation_dim=D_IN, dict_size=D_SAE, k=K, layer=3,
                                    lm_name="EleutherAI/pythia-70m-deduped", group_fractions=FRACTIONS,
                                    group_weights=[0.5, 0.3, 0.2], device="cpu", seed=0,
                                    submodule_name="resid_post_layer_3")
    ae = tr.ae
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking weights: non-zero biases, non-unit decoder rows, a set threshold
        ae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        ae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.2)
        ae.W_enc.add_(torch.randn(D_IN, D_SAE, generator=g) * 0.1)
        ae.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) + 0.5)
        ae.threshold.fill_(0.12)
    folder = tmp_path / "run" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save(ae.state_dict(), folder / "ae.pt")  # what trainSAE writes
    (folder / "config.json").write_text(json.dumps({"trainer": tr.config, "buffer": {"d_submodule": D_IN}}))

    sae = load_sae(tmp_path / "run")
    assert sae.cfg.arch == "matryoshka" and sae.cfg.group_sizes == [32, 64, 160]
    assert sae.cfg.group_weights == [0.5, 0.3, 0.2] and sae.cfg.k == K
    x = _x()
    with torch.no_grad():
        f_ref = ae.encode(x)
        assert (f_ref > 0).any() and (f_ref == 0).any()
        assert _err(sae.encode(x), f_ref) < ATOL
        assert _err(sae(x), ae(x)) < ATOL
    # written back, the file holds the same tensors
    out = save_sae_as(sae, tmp_path / "back", "dictionary_learning")
    again = torch.load(out / "ae.pt", weights_only=True)
    for k, v in ae.state_dict().items():
        assert torch.equal(again[k], v), k


def test_saelens_loads_what_saeforge_writes(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _matryoshka()
    out = save_sae_as(sae, tmp_path / "sl", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert theirs.cfg.architecture() == "jumprelu"
    assert theirs.cfg.metadata.training_architecture == "matryoshka_batchtopk"
    x = _x()
    with torch.no_grad():
        assert _err(theirs.encode(x), sae.encode(x)) < ATOL
        assert _err(theirs.decode(theirs.encode(x)), sae(x)) < ATOL


def test_saelens_own_matryoshka_inference_file_matches_saeforge_writer(tmp_path):
    """SAELens's MatryoshkaBatchTopKTrainingSAE.save_inference_model and saeforge's writer give the same
    layout (architecture, tensor names and shapes), and saeforge reads SAELens's file exactly."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[32, 96, 256],
                                                        rescale_acts_by_decoder_norm=False)
    torch.manual_seed(0)
    trained = sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        trained.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        trained.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.2)
        trained.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) * 0.15)
        trained.topk_threshold.fill_(0.1)
    trained.save_inference_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "theirs"), device="cpu")
    x = _x()
    with torch.no_grad():
        assert _err(ours.encode(x), inference.encode(x)) < ATOL
        assert _err(ours(x), inference.decode(inference.encode(x))) < ATOL
    mine = save_sae_as(_matryoshka(), tmp_path / "mine", "saelens")
    a = json.loads((tmp_path / "theirs/cfg.json").read_text())
    b = json.loads((mine / "cfg.json").read_text())
    assert a["architecture"] == b["architecture"] == "jumprelu"
    assert a["metadata"]["training_architecture"] == b["metadata"]["training_architecture"]
    assert a["metadata"]["training_architecture_details"]["matryoshka_widths"] == \
        b["metadata"]["training_architecture_details"]["matryoshka_widths"]
    from safetensors.torch import load_file
    ta, tb = load_file(str(tmp_path / "theirs/sae_weights.safetensors")), load_file(str(mine / "sae_weights.safetensors"))
    assert {k: v.shape for k, v in ta.items()} == {k: v.shape for k, v in tb.items()}
