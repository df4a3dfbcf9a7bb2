"""Scale-out on torch.distributed (gloo on CPU): every test starts its own processes on loopback.

Data parallel, latent sharding, both at once, N -> M resume and SAEs spread over ranks are compared with
a single process training on the same global batches (tests/dist_worker.py holds the shared settings);
the CLI runs under a real ``torchrun`` (one node, and two "nodes" on localhost with a c10d rendezvous).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker as w
from saeforge.distributed.launch import launch, loopback_env, torchrun_argv
from saeforge.errors import SaeforgeError

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("dist_worker.py"))
TOL = 1e-5

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _run_ranks(n: int, root: Path, *scenarios: str) -> None:
    results = launch(n, [sys.executable, WORKER, str(root), *scenarios], timeout=240, env=_env())
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stdout[-4000:]}"


def _max_diff(a: Path, b: Path) -> dict[str, float]:
    x, y = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert x.keys() == y.keys()
    return {k: float((x[k] - y[k]).abs().max()) for k in x}


def _close(a: Path, b: Path) -> None:
    diffs = _max_diff(a, b)
    assert max(diffs.values()) <= TOL, diffs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process references, trained here on the same global batches."""
    root = tmp_path_factory.mktemp("single")
    w._train("topk", root / "topk")
    w._train("jumprelu", root / "jumprelu")
    with pytest.raises(SaeforgeError, match="ran out"):  # a 1-process run cut after its step-10 checkpoint
        w._train("topk", root / "one_cut", n_batches=w.STEPS // 2, checkpoint_every=w.STEPS // 2)
    return root


@pytest.fixture(scope="module")
def two(single, tmp_path_factory):
    """One launch of 2 ranks running every 2-rank scenario in turn (one process start for all)."""
    root = tmp_path_factory.mktemp("two")
    shutil.copytree(single / "one_cut", root / "one_cut")
    _run_ranks(2, root, "dp_topk", "dp_jumprelu", "shard_forward", "shard_topk", "resume_cut", "resume_from_one",
               "spread")
    return root / "w2"


def test_data_parallel_topk_matches_one_process(single, two):
    _close(single / "topk", two / "dp_topk")
    one = [json.loads(l) for l in (single / "topk" / "metrics.jsonl").read_text().splitlines()]
    dp = [json.loads(l) for l in (two / "dp_topk" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dp] == [r["step"] for r in one] and [r["tokens"] for r in dp] == [r["tokens"] for r in one]
    for a, b in zip(one, dp):  # metrics of the global batch, dead-latent counters included
        assert a["dead_frac"] == b["dead_frac"]
        for k in ("loss", "fvu", "mse", "aux", "l0"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert any(r["aux"] > 0 for r in one)  # AuxK (dead latents) was live


def test_data_parallel_jumprelu_matches_one_process(single, two):
    _close(single / "jumprelu", two / "dp_jumprelu")


def test_latent_sharded_step_selects_the_same_latents(two):
    from saeforge.kernels.topk_step import topk_training_forward
    from saeforge.sae import create_sae
    from saeforge.sae.base import TrainStepInput

    got = torch.load(two / "shard_forward" / "forward.pt")
    sae = create_sae(w.sae_cfg("topk"))
    sae.load_state_dict(got["state"])
    x = got["x"]
    ref = topk_training_forward(sae, TrainStepInput(x, x, 0, 10, got["dead"]))
    ref.loss.backward()
    with torch.no_grad():
        dense = sae.activate(sae.pre_acts(x))
    assert torch.equal(got["codes"] != 0, dense != 0)  # the same latents, row by row
    torch.testing.assert_close(got["codes"], dense)
    torch.testing.assert_close(got["y_hat"], ref.y_hat)
    assert torch.equal(got["fired"], ref.fired)
    assert got["losses"]["aux"] > 0
    for k, v in ref.losses.items():
        torch.testing.assert_close(got["losses"][k], v)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, msg=name)


def test_latent_sharded_training_matches_one_process(single, two):
    _close(single / "topk", two / "shard_topk")
    cfg = json.loads((two / "shard_topk" / "cfg.json").read_text())
    assert cfg["d_sae"] == 128 and cfg["arch"] == "topk"  # one ordinary checkpoint


def test_checkpoint_of_two_ranks_resumes_on_one(single, two, tmp_path):
    shutil.copy(two / "resume_cut" / "checkpoint.safetensors", tmp_path / "checkpoint.safetensors")
    w._train("topk", tmp_path, checkpoint_every=w.STEPS // 2, resume=True)
    _close(single / "topk", tmp_path)


def test_checkpoint_of_one_process_resumes_on_two(single, two):
    _close(single / "topk", two / "resume_from_one")


def test_saes_spread_over_ranks_match_one_process(two, tmp_path):
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    grid = {f"topk_k{k}": make_config("topk", d_in=w.D, d_sae=32 * (1 + (k == 2)), k=k) for k in (2, 3, 4)}
    Trainer(grid, w.stream(), w.train_cfg(10), tmp_path).fit(progress=False)
    for name in grid:
        _close(tmp_path / name, two / "spread" / name)
    ckpt = two / "spread" / "checkpoint.safetensors"
    from saeforge.train.checkpoint import load_checkpoint

    meta, states, _ = load_checkpoint(ckpt)
    assert sorted(meta["names"]) == sorted(grid)  # one checkpoint with every SAE


def test_data_parallel_times_latent_shards(single, tmp_path):
    """4 processes: 2 replicas x 2 latent shards."""
    _run_ranks(4, tmp_path, "shard2_dp")
    _close(single / "topk", tmp_path / "w4" / "shard2_dp")
