"""Sparse TopK kernels against dense reference implementations (issue 7).

Every sparse path is compared with the obvious dense formula written out here: dense pre-activations,
``torch.topk``, a dense code matrix and dense matrix products, differentiated by autograd. fp32
tolerances are 1e-5 relative to the largest entry.
"""
from __future__ import annotations

import json

import pytest
import torch

from saeforge.kernels import (
    batch_topk_encode,
    normalize_rows_,
    remove_parallel_component_,
    set_chunk_elements,
    tune_cpu_allocator,
    dense_to_sparse,
    gather_dots,
    gather_sum,
    index_sum,
    scatter_rows,
    sparse_decode,
    topk_encode,
    topk_rows,
    triton_ops,
)
from saeforge.sae import TrainStepInput, create_sae, make_config
from saeforge.kernels.topk_autograd import sparse_decode as sae_sparse_decode
from saeforge.kernels import select


@pytest.fixture(autouse=True)
def _prune_small_rows(monkeypatch):
    """These tests' batches are small; make ``topk_rows`` prune them anyway (the path large batches take)."""
    monkeypatch.setattr(select, "SMALL", 0)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= rtol * scale


def dense_codes(h: torch.Tensor, k: int) -> torch.Tensor:
    v, i = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, i, v.relu())


# ---- selection -------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,m,k", [(37, 4096, 32), (5, 1000, 7), (8, 64, 8), (3, 2048, 1), (4, 512, 512),
                                   (41, 1024, 32), (9, 512, 16), (6, 256, 4)])  # groups of 32, 8, 8, 16
def test_topk_rows_selects_the_same_values_as_torch_topk(B, m, k):
    g = torch.Generator().manual_seed(m + k)
    h = torch.randn(B, m, generator=g)
    v, i = topk_rows(h, k)
    ref = h.topk(k, dim=-1).values
    assert torch.equal(v.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(h.gather(1, i), v)  # indices point at the values
    assert (i.sort(-1).values.diff(dim=-1) > 0).all()  # no index twice


@pytest.mark.parametrize("m", [4096, 1024])
def test_topk_rows_with_ties_and_bf16(m):
    h = torch.randint(0, 5, (16, m)).float()  # massive ties: only the multiset is defined
    v, i = topk_rows(h, 32)
    assert torch.equal(v.sort(-1).values, h.topk(32).values.sort(-1).values)
    assert torch.equal(h.gather(1, i), v)
    hb = torch.randn(16, 4096).bfloat16()
    vb, ib = topk_rows(hb, 16)
    assert vb.dtype == torch.bfloat16
    assert torch.equal(vb.sort(-1).values, hb.topk(16).values.sort(-1).values)


def test_topk_rows_keeps_nan_and_handles_infinite_rows():
    """A NaN pre-activation must reach the loss (the trainer's guard reports it), never drop out of the
    candidates; rows of −inf and rows with a single finite value still give k distinct indices."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 4096, generator=g)
    h[1, 77] = float("nan")
    h[2] = float("-inf")
    h[3] = float("-inf")
    h[3, 1000] = 2.0
    v, i = topk_rows(h, 32)
    assert torch.isnan(v[1]).any() and 77 in i[1].tolist()
    assert torch.equal(v[0].sort().values, h[0].topk(32).values.sort().values)
    assert (v[2] == float("-inf")).all() and v[3].max() == 2.0 and 1000 in i[3].tolist()
    assert (i.sort(-1).values.diff(dim=-1) > 0).all()


# ---- primitives ------------------------------------------------------------------------------------
def test_sparse_primitives_match_dense_products():
    g = torch.Generator().manual_seed(0)
    B, K, n, d = 9, 5, 40, 6
    idx = torch.randint(0, n, (B, K), generator=g)
    idx[0, 1] = idx[0, 0]  # a repeated index in one row must add up
    w = torch.randn(B, K, generator=g)
    W = torch.randn(n, d, generator=g)
    src = torch.randn(B, d, generator=g)
    S = torch.zeros(B, n).index_put_((torch.arange(B).repeat_interleave(K), idx.flatten()), w.flatten(), accumulate=True)
    assert close(gather_sum(idx, w, W), S @ W)
    assert close(scatter_rows(idx, w, src, n), S.T @ src)
    assert close(index_sum(idx, w, n), S.sum(0))
    dots = torch.stack([torch.stack([W[idx[b, j]] @ src[b] for j in range(K)]) for b in range(B)])
    assert close(gather_dots(idx, W, src), dots)
    empty = idx[:, :0]
    assert torch.equal(gather_sum(empty, w[:, :0], W), torch.zeros(B, d))
    assert torch.equal(scatter_rows(empty, w[:, :0], src, n), torch.zeros(n, d))


def test_sparse_decode_forward_and_backward_match_dense():
    g = torch.Generator().manual_seed(1)
    B, n, d, k = 11, 50, 7, 4
    h = torch.randn(B, n, generator=g)
    v, i = h.topk(k)
    v = v.clone().requires_grad_()
    W = torch.randn(n, d, generator=g, requires_grad=True)
    b = torch.randn(d, generator=g, requires_grad=True)
    out = sae_sparse_decode(v, i, W, b)  # the SAE module's entry point, same signature as before
    gy = torch.randn(B, d, generator=g)
    gv, gW, gb = torch.autograd.grad(out, (v, W, b), gy)
    v2 = v.detach().clone().requires_grad_()
    W2 = W.detach().clone().requires_grad_()
    f = torch.zeros(B, n).scatter(1, i, v2)
    ref = f @ W2 + b.detach()
    rv, rW = torch.autograd.grad(ref, (v2, W2), gy)
    assert close(out, ref) and close(gv, rv) and close(gW, rW) and close(gb, gy.sum(0))
    lead = sparse_decode(v.detach().view(1, B, k), i.view(1, B, k), W.detach())  # leading dims kept
    assert lead.shape == (1, B, d) and close(lead[0], ref - b.detach())


# ---- TopK encoder ----------------------------------------------------------------------------------
def _dense_topk_loss(x, W_enc, b_enc, b_pre, W_dec, k, dead=None, k_aux=0):
    h = (x - b_pre) @ W_enc + b_enc
    f = dense_codes(h, k)
    y_hat = f @ W_dec + b_pre
    loss = (y_hat - x).pow(2).sum()
    if dead is not None:
        hd = h.masked_fill(~dead, float("-inf"))
        av, ai = hd.topk(k_aux)
        fa = torch.zeros_like(h).scatter(1, ai, av.relu())
        loss = loss + 0.5 * ((fa @ W_dec) - (x - y_hat).detach()).pow(2).sum()
    return loss


def _sparse_topk_loss(x, W_enc, b_enc, b_pre, W_dec, k, dead=None, k_aux=0, chunk_rows=None):
    c = topk_encode(x, W_enc, b_enc, k, b_pre=b_pre, dead_mask=dead, k_aux=k_aux, chunk_rows=chunk_rows)
    y_hat = sparse_decode(c.vals, c.idx, W_dec, b_pre)
    loss = (y_hat - x).pow(2).sum()
    if dead is not None:
        loss = loss + 0.5 * (sparse_decode(c.aux_vals, c.aux_idx, W_dec) - (x - y_hat).detach()).pow(2).sum()
    return loss


@pytest.mark.parametrize("dead_kind", ["none", "some", "all", "no_aux"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])
def test_topk_encode_loss_and_gradients_match_dense(dead_kind, chunk_rows):
    g = torch.Generator().manual_seed(3)
    B, d, n, k, k_aux = 23, 12, 256, 6, 16
    x = torch.randn(B, d, generator=g).requires_grad_()
    params = [torch.randn(d, n, generator=g) / d**0.5, torch.randn(n, generator=g) * 0.1,
              torch.randn(d, generator=g) * 0.1, torch.randn(n, d, generator=g) / d**0.5]
    dead = None
    if dead_kind != "no_aux":
        dead = torch.zeros(n, dtype=torch.bool)
        if dead_kind == "some":
            dead[torch.randperm(n, generator=g)[:40]] = True  # some of them also win the main top-k
        elif dead_kind == "all":
            dead[:] = True
    grads = []
    losses = []
    for fn, kw in ((_dense_topk_loss, {}), (_sparse_topk_loss, {"chunk_rows": chunk_rows})):
        ps = [p.clone().requires_grad_() for p in params]
        xx = x.detach().clone().requires_grad_()
        loss = fn(xx, *ps, k, dead, k_aux, **kw)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [xx, *ps]))
    assert close(losses[0], losses[1])
    for a, b in zip(*grads):
        assert close(a, b), (a - b).abs().max()


def test_topk_encode_under_bf16_autocast_follows_eager_autocast():
    g = torch.Generator().manual_seed(4)
    B, d, n, k = 16, 32, 128, 8
    x = torch.randn(B, d, generator=g)
    W = (torch.randn(d, n, generator=g) / d**0.5).requires_grad_()
    b = torch.zeros(n, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = topk_encode(x, W, b, k)
        h = x @ W + b  # eager autocast: bf16 product, fp32 bias add -> fp32
    assert h.dtype == torch.float32 and c.vals.dtype == torch.float32
    ref_v, ref_i = h.topk(k)
    assert torch.equal(c.vals.sort(-1).values, ref_v.relu().sort(-1).values)
    (gW,) = torch.autograd.grad(c.vals.sum(), W)
    assert gW.dtype == torch.float32  # fp32 master-weight gradients
    gref = x.T @ torch.zeros(B, n).scatter(1, ref_i, (ref_v > 0).float())
    assert close(gW, gref, 1e-2)


# ---- BatchTopK encoder ------------------------------------------------------------------------------
@pytest.mark.parametrize("heavy_rows", [False, True])
def test_batch_topk_encode_matches_dense_batch_topk(heavy_rows):
    g = torch.Generator().manual_seed(5)
    B, d, n, k = 32, 16, 256, 4
    x = torch.randn(B, d, generator=g)
    if heavy_rows:  # two rows own most of the batch budget: forces the widening pass
        x[3] *= 40
        x[17] *= 30
    W = (torch.randn(d, n, generator=g) / d**0.5).requires_grad_()
    b = (torch.randn(n, generator=g) * 0.1).requires_grad_()
    Wd = (torch.randn(n, d, generator=g) / d**0.5).requires_grad_()
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::5] = True
    codes, theta = batch_topk_encode(x, W, b, k, dead_mask=dead, k_aux=8, chunk_rows=5, cand_factor=2)
    vals, idx = codes.vals, codes.idx
    y_hat = sparse_decode(vals, idx, Wd)
    aux = (sparse_decode(codes.aux_vals, codes.aux_idx, Wd) - (x - y_hat).detach()).pow(2).sum()
    loss = (y_hat - x).pow(2).sum() + 0.1 * aux
    gs = torch.autograd.grad(loss, (W, b, Wd))
    h = x @ W + b
    flat = h.relu().flatten()
    tv, ti = flat.topk(B * k)
    f = torch.zeros_like(flat).scatter(0, ti, tv).view(B, n)
    av, ai = h.masked_fill(~dead, float("-inf")).topk(8)
    fa = torch.zeros_like(h).scatter(1, ai, av.relu())
    ref = (f @ Wd - x).pow(2).sum() + 0.1 * (fa @ Wd - (x - f @ Wd).detach()).pow(2).sum()
    rs = torch.autograd.grad(ref, (W, b, Wd))
    assert close(loss, ref)
    for a, r in zip(gs, rs):
        assert close(a, r)
    assert torch.isclose(theta, tv.min())
    assert int((vals > 0).sum()) == int((f > 0).sum())
    if heavy_rows:
        assert (vals > 0).sum(1).max() > 2 * k  # a row kept more than its first candidate set


# ---- the full TopK training forward ----------------------------------------------------------------
def _dense_training_loss(sae, x, dead):
    """Independent dense TopK step: Gao et al.'s normalised MSE + AuxK/32 with dense codes."""
    cfg = sae.cfg
    h = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    y_hat = dense_codes(h, cfg.k) @ sae.W_dec + sae.b_dec
    e = x - y_hat
    var = (x - x.mean(0)).pow(2).sum()
    loss = e.pow(2).sum() / var
    if dead.any():
        av, ai = h.masked_fill(~dead, float("-inf")).topk(cfg.k_aux)
        fa = torch.zeros_like(h).scatter(1, ai, av.relu())
        loss = loss + cfg.aux_coef * ((fa @ sae.W_dec) - e.detach()).pow(2).sum() / var
    return loss


@pytest.mark.parametrize("multi_topk,any_dead", [(False, True), (True, True), (False, False), (False, None)])
def test_topk_training_forward_matches_dense_and_the_sae(multi_topk, any_dead):
    torch.manual_seed(0)
    cfg = make_config("topk", d_in=16, d_sae=512, k=8, k_aux=32, multi_topk=multi_topk)
    saes = [create_sae(cfg) for _ in range(3)]
    for s in saes[1:]:
        s.load_state_dict(saes[0].state_dict())
    x = torch.randn(64, 16)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::3] = bool(any_dead)
    inp = TrainStepInput(x, x, 0, 10, None if any_dead is None else dead)  # None: the trainer skips AuxK
    outs = [saes[0].training_forward_with(inp, sparse=True, chunk_rows=9), saes[1].training_forward_with(inp, sparse=False)]
    if not multi_topk:
        outs.append(type("O", (), {"loss": _dense_training_loss(saes[2], x, dead)})())
    for o in outs[1:]:
        assert close(outs[0].loss, o.loss)
    for o in outs:
        o.loss.backward()
    for name, p in saes[0].named_parameters():
        for s in saes[1:len(outs)]:
            assert close(p.grad, dict(s.named_parameters())[name].grad), name
    assert torch.equal(outs[0].fired, outs[1].fired)
    assert close(outs[0].y_hat, outs[1].y_hat)


@pytest.mark.parametrize("sparse", [True, False])
def test_encoder_weight_and_its_gradient_are_latent_major(sparse):
    # W_enc is [d_in, d_sae] stored as [d_sae, d_in], the layout the sparse backward writes its gradient in,
    # so autograd keeps that gradient as it is instead of copying it transposed each step.
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=16, d_sae=128, k=4))
    assert sae.W_enc.shape == (16, 128) and sae.W_enc.stride() == (1, 16)
    x = torch.randn(32, 16)
    sae.training_forward_with(TrainStepInput(x, x, 0, 10, None), sparse=sparse).loss.backward()
    assert sae.W_enc.grad.stride() == sae.W_enc.stride()
    # a transcoder's W_enc is drawn, not copied: the same numbers as drawing into a [d_in, d_sae] tensor
    tc = create_sae(make_config("topk", d_in=16, d_sae=128, k=4, d_out=8, apply_b_dec_to_input=False))
    torch.manual_seed(3)
    tc.reset_parameters()
    torch.manual_seed(3)
    torch.nn.init.kaiming_uniform_(torch.empty(128, 8), a=5 ** 0.5)
    assert torch.equal(tc.W_enc, torch.nn.init.kaiming_uniform_(torch.empty(16, 128), a=5 ** 0.5))


def test_twenty_adam_steps_give_the_same_weights_as_the_dense_step():
    torch.manual_seed(1)
    cfg = make_config("topk", d_in=12, d_sae=256, k=6, k_aux=16)
    a, b = create_sae(cfg), create_sae(cfg)
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.Adam(s.parameters(), lr=1e-3, eps=6.25e-10) for s in (a, b)]
    gen = torch.Generator().manual_seed(2)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[200:] = True
    for step in range(20):
        x = torch.randn(48, 12, generator=gen)
        for s, opt, fwd in ((a, opts[0], lambda s, i: s.training_forward_with(i, sparse=True, chunk_rows=16)),
                            (b, opts[1], lambda s, i: _dense_training_loss(s, i.x, i.dead_mask))):
            out = fwd(s, TrainStepInput(x, x, step, 20, dead))
            (out.loss if hasattr(out, "loss") else out).backward()
            s.before_optimizer_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            s.after_optimizer_step(step, 20)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert close(p, q, 1e-5), name
    assert not torch.equal(a.W_enc, create_sae(cfg).W_enc)  # training moved the weights


def test_dense_to_sparse_round_trip_and_gradient():
    f = torch.zeros(5, 30)
    f[0, [1, 4, 9]] = torch.tensor([1.0, -2.0, 3.0])
    f[3, 29] = 0.5
    f.requires_grad_()
    v, i = dense_to_sparse(f)
    assert v.shape == (5, 3)
    W = torch.randn(30, 4)
    out = sparse_decode(v, i, W)
    assert close(out, f.detach() @ W)
    gy = torch.randn(5, 4)
    (gf,) = torch.autograd.grad(out, f, gy)
    mask = (f.detach() != 0).float()
    assert close(gf, (gy @ W.T) * mask)  # gradient reaches f at its non-zeros only
    v0, i0 = dense_to_sparse(torch.zeros(3, 7))
    assert v0.shape == (3, 1) and not v0.any()


def test_decoder_row_constraints_match_the_broadcast_formulas():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(50, 9, generator=g) * 3
    G = torch.randn(50, 9, generator=g)
    w = W / W.norm(dim=1, keepdim=True)
    ref = G - (G * w).sum(1, keepdim=True) * w  # Gao et al. §A.1 as written in SAE.remove_parallel_decoder_grad
    out = remove_parallel_component_(W, G.clone())
    assert close(out, ref)
    assert (out * W).sum(1).abs().max() < 1e-4  # nothing parallel to the rows is left
    assert close(normalize_rows_(W.clone()), w)


def test_chunk_budget_and_allocator_tuning_change_no_numbers():
    g = torch.Generator().manual_seed(9)
    x, W = torch.randn(40, 8, generator=g), torch.randn(8, 300, generator=g)
    ref = topk_encode(x, W, None, 5)
    try:
        set_chunk_elements(3 * 300)  # three rows of pre-activations at a time
        small = topk_encode(x, W, None, 5)
    finally:
        set_chunk_elements(1 << 28)
    assert isinstance(tune_cpu_allocator(), bool)
    tuned = topk_encode(x, W, None, 5)
    for c in (small, tuned):  # same selection; values to rounding (the product is blocked differently)
        assert torch.equal(c.idx.sort(-1).values, ref.idx.sort(-1).values)
        assert close(c.vals.sort(-1).values, ref.vals.sort(-1).values, 1e-6)
    with pytest.raises(ValueError):
        set_chunk_elements(0)


# ---- Triton (CUDA only) -----------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")
def test_triton_kernels_match_torch_path():
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(7)
    B, K, n, d = 300, 33, 1000, 200
    idx = torch.randint(0, n, (B, K), generator=g).to(dev)
    w = torch.randn(B, K, generator=g).to(dev)
    W = torch.randn(n, d, generator=g).to(dev)
    src = torch.randn(B, d, generator=g).to(dev)
    S = torch.zeros(B, n, device=dev).index_put_(
        (torch.arange(B, device=dev).repeat_interleave(K), idx.flatten()), w.flatten(), accumulate=True)
    assert close(triton_ops.gather_sum(idx, w, W), S @ W, 1e-4)
    assert close(triton_ops.scatter_rows(idx, w, src, n), S.T @ src, 1e-4)
    dots = (W[idx] * src[:, None, :]).sum(-1)
    assert close(triton_ops.gather_dots(idx, W, src), dots, 1e-4)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_trainer_sparse_and_dense_kernels_train_the_same_weights(tmp_path, multi_topk):
    """TopKSAE.training_forward runs on the kernels by default; through the real Trainer (warm-up, AuxK
    with dead latents, clipping, decoder constraints, fused Adam) 20 steps match the dense path."""
    from saeforge.synthetic import SuperpositionStream
    from saeforge.train import TrainConfig, Trainer

    cfg = make_config("topk", d_in=16, d_sae=256, k=4, k_aux=32, multi_topk=multi_topk)
    assert create_sae(cfg).sparse_kernels
    weights = []
    for kernels in ("sparse", "dense"):
        stream = SuperpositionStream(d=16, n_features=64, p=0.05, batch_size=128, seed=3)
        tc = TrainConfig(total_tokens=20 * 128, batch_size=128, lr=3e-3, dead_tokens=256, log_every=5,
                         checkpoint_every=0, device="cpu", dtype="float32", kernels=kernels, init_tokens=512)
        sae = Trainer({"": cfg}, stream, tc, tmp_path / kernels).fit(progress=False)[""]
        assert sae.sparse_kernels == (kernels == "sparse")
        weights.append({k: v.detach().clone() for k, v in sae.state_dict().items()})
    aux = [json.loads(line).get("aux", 0.0) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert any(a > 0 for a in aux)  # AuxK was active
    for name in weights[0]:
        assert close(weights[0][name], weights[1][name], 1e-5), name


@pytest.mark.parametrize("any_dead", [True, False, None])
def test_batchtopk_sparse_training_forward_matches_dense(any_dead):
    torch.manual_seed(4)
    cfg = make_config("batchtopk", d_in=16, d_sae=384, k=6, k_aux=24, threshold_start_step=0)
    a, b = create_sae(cfg), create_sae(cfg)
    b.load_state_dict(a.state_dict())
    assert a.sparse_kernels
    x = torch.randn(80, 16) * torch.linspace(0.2, 3.0, 80).unsqueeze(1)  # uneven rows: uneven budgets
    dead = torch.zeros(384, dtype=torch.bool)
    dead[1::4] = bool(any_dead)
    inp = TrainStepInput(x, x, 5, 10, None if any_dead is None else dead)
    oa, ob = a.training_forward(inp), b.training_forward_with(inp, sparse=False)
    assert close(oa.loss, ob.loss) and close(oa.y_hat, ob.y_hat)
    assert torch.equal(oa.fired, ob.fired) and torch.isclose(oa.l0, ob.l0)
    assert set(oa.losses) == set(ob.losses)
    assert torch.isclose(a.threshold, b.threshold) and float(a.threshold) > 0
    oa.loss.backward()
    ob.loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert close(p.grad, q.grad), name


@pytest.mark.parametrize("arch", ["jumprelu", "jumprelu-gemmascope"])
def test_jumprelu_sparse_decode_matches_dense(arch):
    torch.manual_seed(6)
    cfg = make_config("jumprelu", d_in=16, d_sae=512,
                      recipe="gemmascope" if arch.endswith("gemmascope") else "anthropic2025")
    a, b = create_sae(cfg), create_sae(cfg)
    with torch.no_grad():  # only the first 40 latents can clear the threshold: the sparse decode is taken
        a.b_enc.fill_(-5.0)
        a.b_enc[:40] = 1.2 + torch.rand(40)
    b.load_state_dict(a.state_dict())
    b.sparse_kernels = False
    x = torch.randn(64, 16)
    inp = TrainStepInput(x, x, 3, 10, None)
    from saeforge.kernels import topk_autograd

    calls = []
    real = topk_autograd.sparse_decode
    topk_autograd.sparse_decode = lambda *a_: calls.append(1) or real(*a_)
    try:
        oa, ob = a.training_forward(inp), b.training_forward(inp)
    finally:
        topk_autograd.sparse_decode = real
    assert len(calls) == 1  # the sparse decode ran for `a` only
    active = oa.l0.item()
    assert 0 < active <= 512 / 8
    assert close(oa.loss, ob.loss) and close(oa.y_hat, ob.y_hat)
    oa.loss.backward()
    ob.loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert close(p.grad, q.grad), n
