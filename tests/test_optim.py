"""Schedule-free sign descent (saeforge/train/optim.py): worked by hand, against the ``schedulefree``
package (sparsify's optimizer) when it is installed, and through the trainer (checkpoint resume, resample)."""
from __future__ import annotations

import pytest
import torch

from saeforge.train.optim import ScheduleFreeSign, match_param_layout


def test_two_steps_worked_by_hand():
    # one weight w0 = 1, lr 0.1, β = 0.5; gradients +3 then -2 (only their signs count)
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = ScheduleFreeSign([p], lr=0.1, momentum=0.5)
    p.grad = torch.tensor([3.0])
    opt.step()
    # z = 1 - 0.1 = 0.9; x = average of {z1} with weight 1 → 0.9 (c = 1); y = 0.5·0.9 + 0.5·0.9 = 0.9
    assert p.item() == pytest.approx(0.9)
    p.grad = torch.tensor([-2.0])
    opt.step()
    # x from y: (0.9 - 0.5·0.9)/0.5 = 0.9; z = 0.9 + 0.1 = 1.0; x = 0.9 + ½(1.0 - 0.9) = 0.95
    # y = 0.5·0.95 + 0.5·1.0 = 0.975
    assert p.item() == pytest.approx(0.975)
    assert opt.state[p]["z"].item() == pytest.approx(1.0)


def test_zero_gradient_leaves_the_weight():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    opt = ScheduleFreeSign([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.zeros(2)
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.25]))


@pytest.mark.parametrize("power", [0.0, 2.0])
def test_matches_the_schedulefree_package(power):
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(a.detach().clone())

    class SignSGD(torch.optim.Optimizer):  # sparsify's sign_sgd.py
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.add_(p.grad.sign(), alpha=-g["lr"])

    ours = ScheduleFreeSign([a], lr=0.01, momentum=0.95, power=power)
    ref = schedulefree.ScheduleFreeWrapper(SignSGD([b], lr=0.01), momentum=0.95, r=power)
    ref.train()
    target = torch.randn(6, 5)
    for _ in range(30):
        for p in (a, b):
            p.grad = None
            ((p - target) ** 3).sum().backward()
        ours.step()
        ref.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_resampling_resets_the_schedule_free_state_of_the_reset_rows_only():
    from saeforge.sae.functional import reset_optimizer_rows_

    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = ScheduleFreeSign([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.ones(3, 2)
        opt.step()
    z_before = opt.state[p]["z"].clone()
    with torch.no_grad():
        p[1] = torch.tensor([5.0, 6.0])  # latent 1 re-initialised
    reset_optimizer_rows_(opt, p, torch.tensor([1]), 0)
    z = opt.state[p]["z"]
    assert torch.equal(z[1], torch.tensor([5.0, 6.0]))  # x = y = z there: the next step starts from the new row
    assert torch.equal(z[[0, 2]], z_before[[0, 2]])
    p.grad = torch.zeros(3, 2)
    opt.step()
    assert torch.equal(p.detach()[1], torch.tensor([5.0, 6.0]))


def test_loaded_state_takes_its_weight_layout_and_keeps_its_values():
    w = torch.nn.Parameter(torch.randn(6, 4).t())  # stored transposed, as SAE.W_enc
    opt = ScheduleFreeSign([w], lr=0.1)
    w.grad = torch.randn(4, 6)
    opt.step()
    saved = {k: v for k, v in opt.state_dict().items()}
    z = saved["state"][0]["z"]
    saved["state"][0]["z"] = z.contiguous()  # as read back from a safetensors checkpoint
    assert saved["state"][0]["z"].stride() != w.stride()
    fresh = ScheduleFreeSign([w], lr=0.1)
    fresh.load_state_dict(saved)
    match_param_layout(fresh)
    z2 = fresh.state[w]["z"]
    assert z2.stride() == w.stride() and torch.equal(z2, z)
