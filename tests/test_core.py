"""Core pieces: JSON configs, atomic writes, the SAE base, TopK maths, geometric median, LR schedule."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from saeforge.config import ConfigError, JsonConfig
from saeforge.errors import SaeforgeError
from saeforge.io import atomic_open, sha256_file, write_json_atomic
from saeforge.sae import SAE, TrainStepInput, create_sae, make_config
from saeforge.sae.geometric_median import geometric_median
from saeforge.kernels.topk_autograd import sparse_decode
from saeforge.sae.topk import topk_relu
from saeforge.train.schedule import lr_factor


@dataclass
class Inner(JsonConfig):
    a: int = 1
    b: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer(JsonConfig):
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    opt: Inner | None = None
    items: list[int] = field(default_factory=list)


def test_config_round_trip_and_strict_keys(tmp_path):
    c = Outer(name="y", inner=Inner(a=3, b=(0.5, 0.6)), opt=Inner(a=7), items=[1, 2])
    c.save(tmp_path / "c.json")
    back = Outer.load(tmp_path / "c.json")
    assert back == c and isinstance(back.inner, Inner) and back.inner.b == (0.5, 0.6)
    with pytest.raises(ConfigError, match="unknown key.*'nme'"):
        Outer.from_dict({"nme": "typo"})


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.json"
    write_json_atomic(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(p, "wb") as fh:
            fh.write(b"partial")
            raise RuntimeError("crash")
    assert json.loads(p.read_text()) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind
    assert len(sha256_file(p)) == 64


def test_geometric_median_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(50, 2, generator=g, dtype=torch.float64)
    pts[:5] += 40.0  # outliers pull the mean, not the median
    m = geometric_median(pts, max_iter=1000, tol=1e-12)
    cost = lambda c: (pts - c).norm(dim=1).sum()  # noqa: E731
    # brute-force grid around the answer: no point does better
    xs = torch.linspace(-0.05, 0.05, 41, dtype=torch.float64)
    best = min(cost(m + torch.stack([dx, dy])) for dx in xs for dy in xs)
    assert cost(m) <= best + 1e-9
    assert (m - pts.mean(0)).norm() > 1.0


def test_topk_encode_decode_by_hand():
    cfg = make_config("topk", d_in=3, d_sae=4, k=2, apply_b_dec_to_input=True)
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0, -1], [0, 1, 0, 0], [0, 0, 1, 0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.1, -5.0, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0, 1.0]))
    x = torch.tensor([[3.0, 2.0, 1.0]])
    # x - b_dec = [2, 1, 0]; h = [2, 1.1, -5, -2]; top-2 = latents 0 and 1
    f = sae.encode(x)
    assert torch.allclose(f, torch.tensor([[2.0, 1.1, 0.0, 0.0]]))
    assert torch.allclose(sae.decode(f), torch.tensor([[3.0, 2.1, 1.0]]))
    # top-k then ReLU: a negative k-th value becomes 0
    v, i = topk_relu(torch.tensor([[-1.0, -2.0, 3.0]]), 2)
    assert sorted(v.tolist()[0]) == [0.0, 3.0]


def test_sparse_decode_equals_dense():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(20, 5, generator=g, requires_grad=True)
    vals = torch.rand(7, 3, generator=g, requires_grad=True)
    idx = torch.randint(0, 20, (7, 3), generator=g)
    out = sparse_decode(vals, idx, W, None)
    dense = torch.zeros(7, 20).scatter_add(1, idx, vals)
    ref = dense @ W
    assert torch.allclose(out, ref, atol=1e-6)
    gw1, gv1 = torch.autograd.grad(out.square().sum(), (W, vals))
    gw2, gv2 = torch.autograd.grad(ref.square().sum(), (W, vals))
    assert torch.allclose(gw1, gw2, atol=1e-5) and torch.allclose(gv1, gv2, atol=1e-5)


def test_parallel_grad_removed_and_unit_norm_kept():
    sae = create_sae(make_config("topk", d_in=6, d_sae=10, k=3))
    x = torch.randn(32, 6)
    out = sae.training_forward(TrainStepInput(x, x, 0, 10))
    out.loss.backward()
    sae.before_optimizer_step()
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert (sae.W_dec.grad * rows).sum(1).abs().max() < 1e-6
    torch.optim.SGD(sae.parameters(), lr=0.5).step()
    sae.after_optimizer_step(0, 10)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)


def test_encoder_initialised_as_decoder_transpose():
    sae = create_sae(make_config("topk", d_in=6, d_sae=10, k=3))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)


def test_topk_loss_and_auxk_by_hand():
    """Normalised MSE and AuxK against a direct numpy computation (Gao et al. 2024 §A.2)."""
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=4, d_sae=8, k=2, k_aux=3, aux_coef=0.25))
    x = torch.randn(16, 4)
    dead = torch.tensor([True, False, True, True, False, False, True, False])
    out = sae.training_forward(TrainStepInput(x, x, 0, 10, dead))
    X = x.numpy().astype(np.float64)
    We, be, Wd, bd = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    H = (X - bd) @ We + be
    F = np.zeros_like(H)
    for r in range(16):
        top = np.argsort(-H[r])[:2]
        F[r, top] = np.maximum(H[r, top], 0)
    E = X - (F @ Wd + bd)
    var = ((X - X.mean(0)) ** 2).sum()
    mse = (E**2).sum() / var
    Hd = np.where(dead, H, -np.inf)
    A = np.zeros_like(H)
    for r in range(16):
        top = np.argsort(-Hd[r])[:3]
        A[r, top] = np.maximum(Hd[r, top], 0)
    aux = ((A @ Wd - E) ** 2).sum() / var
    assert out.losses["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out.losses["aux"].item() == pytest.approx(aux, rel=1e-5)
    assert out.loss.item() == pytest.approx(mse + 0.25 * aux, rel=1e-5)
    # the AuxK gradient reaches the encoder columns of dead latents
    sae.zero_grad()
    (out.losses["aux"]).backward()
    assert sae.W_enc.grad[:, dead].abs().sum() > 0
    assert out.l0.item() == pytest.approx((F > 0).sum(1).mean())


def test_auxk_zero_without_dead_latents():
    sae = create_sae(make_config("topk", d_in=4, d_sae=8, k=2))
    x = torch.randn(16, 4)
    out = sae.training_forward(TrainStepInput(x, x, 0, 10, torch.zeros(8, dtype=torch.bool)))
    assert out.losses["aux"].item() == 0.0


def test_layer_norm_input_round_trip():
    """decode(encode(x)) undoes a per-row layer norm (SAELens/OpenAI convention, unbiased std + 1e-5)."""
    sae = create_sae(make_config("relu", d_in=5, d_sae=10, input_norm="layer_norm", apply_b_dec_to_input=False))
    with torch.no_grad():  # exact identity in the normalised space: W_dec = [I; -I]
        sae.W_enc.copy_(torch.cat([torch.eye(5), -torch.eye(5)], 1))
        sae.W_dec.copy_(torch.cat([torch.eye(5), -torch.eye(5)], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    x = torch.randn(3, 5) * 4 + 2
    xn = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)
    f = sae.encode(x)
    assert torch.allclose(f[:, :5] - f[:, 5:], xn, atol=1e-5)
    assert torch.allclose(sae.decode(f), x, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    sae = create_sae(make_config("topk", d_in=6, d_sae=12, k=3, hook="resid_post.2"))
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["arch"] == "topk"
    back = SAE.load(tmp_path / "s")
    x = torch.randn(4, 6)
    assert torch.equal(back(x), sae(x)) and back.cfg == sae.cfg


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(SaeforgeError, match="unknown SAE architecture 'nope'; choose one of"):
        make_config("nope", d_in=4, d_sae=8)
    with pytest.raises(SaeforgeError, match="k=9 must be between 1 and d_sae=8"):
        make_config("topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(SaeforgeError, match="not a saeforge SAE folder"):
        SAE.load(tmp_path)


def test_lr_schedule_warmup_and_decay():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[50] == 1.0 and f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5)
    assert f[99] == pytest.approx(0.05)
