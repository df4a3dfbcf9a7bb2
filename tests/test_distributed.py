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
    w._train("batchtopk", root / "batchtopk")
    w._train("matryoshka", root / "matryoshka")
    with pytest.raises(SaeforgeError, match="ran out"):  # a 1-process run cut after its step-10 checkpoint
        w._train("topk", root / "one_cut", n_batches=w.STEPS // 2, checkpoint_every=w.STEPS // 2)
    return root


@pytest.fixture(scope="module")
def two(single, tmp_path_factory):
    """One launch of 2 ranks running every 2-rank scenario in turn (one process start for all)."""
    root = tmp_path_factory.mktemp("two")
    shutil.copytree(single / "one_cut", root / "one_cut")
    live = ("live_dp",) if w.MODEL.exists() and w.TEXT.exists() else ()
    _run_ranks(2, root, "dp_topk", "dp_jumprelu", "dp_batchtopk", "dp_matryoshka", "shard_forward", "shard_topk", "resume_cut", "resume_from_one",
               "spread", *live)
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


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_data_parallel_batchtopk_matches_one_process(single, two, arch):
    """The batch top-k is taken over the global batch (an exact threshold across the ranks), the threshold
    estimate and AuxK's normaliser too: 2 ranks train the 1-process SAE, threshold included."""
    _close(single / arch, two / f"dp_{arch}")
    thr = load_file(str(single / arch / "sae.safetensors"))["threshold"]
    assert float(thr) > 0
    one = [json.loads(l) for l in (single / arch / "metrics.jsonl").read_text().splitlines()]
    dp = [json.loads(l) for l in (two / f"dp_{arch}" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, dp):
        for k in ("loss", "fvu", "l0", "aux"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert any(r["aux"] > 0 for r in one)


def test_latent_sharded_step_selects_the_same_latents(two):
    from saeforge.sae import create_sae
    from saeforge.sae.base import TrainStepInput

    got = torch.load(two / "shard_forward" / "forward.pt")
    sae = create_sae(w.sae_cfg("topk"))
    sae.load_state_dict(got["state"])
    x = got["x"]
    ref = sae.training_forward_with(TrainStepInput(x, x, 0, 10, got["dead"]), sparse=True)
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


def test_data_parallel_from_a_live_stream_matches_one_process(two, tmp_path, stories_model_path):
    """The model's forward passes are split over the ranks; the global batches stay those of one process."""
    w.train_live(tmp_path)
    _close(tmp_path, two / "live_dp")


def test_data_parallel_times_latent_shards(single, tmp_path):
    """4 processes: 2 replicas x 2 latent shards."""
    _run_ranks(4, tmp_path, "shard2_dp")
    _close(single / "topk", tmp_path / "w4" / "shard2_dp")


# ---- the CLI under a real torchrun -------------------------------------------------------------------------
HARVEST = ["--hooks", "resid_post.2", "--max-tokens", "6000", "--context-len", "32", "--batch-contexts", "8",
           "--shard-tokens", "512", "--quiet"]


def _cli(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, env=loopback_env(_env()), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _in_process(argv: list[str]) -> None:
    """``saeforge ARGV`` in this process, on one thread like the launched ranks (same forward numerics)."""
    from saeforge.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _ranks(n: int, args: list[str]) -> list[subprocess.CompletedProcess]:
    """``python -m saeforge ARGS`` as n ranks, started directly (no torchrun agent: quicker)."""
    results = launch(n, [sys.executable, "-m", *args], timeout=240, env=_env())
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    return results


@pytest.fixture(scope="module")
def cache_one(tmp_path_factory, stories_model_path, tinystories_train):
    out = tmp_path_factory.mktemp("harvest") / "one"
    _in_process(["harvest", "--model", str(stories_model_path), "--data", str(tinystories_train), "--out", str(out),
                 *HARVEST])
    return out


def test_distributed_harvest_is_byte_identical_and_resumes_after_a_rank_is_killed(
        cache_one, stories_model_path, tinystories_train, tmp_path):
    """2 ranks harvest; rank 1 is SIGKILLed as it finishes shard 5 (its third) and rank 0 is stopped (as torchrun
    would); rerunning under torchrun finishes the cache, which is byte-identical to the one-process harvest."""
    args = ["saeforge", "harvest", "--model", str(stories_model_path), "--data", str(tinystories_train), *HARVEST]
    cut = tmp_path / "cut"
    script = (
        "import os, signal, sys\n"
        "from saeforge.cli import main\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('shard_00005.safetensors'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "os.replace = replace\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = launch(2, [sys.executable, "-c", script, *args[1:], "--out", str(cut)], timeout=240, env=_env())
    assert res[1].returncode == -9, res[1].stdout[-2000:]
    m = json.loads((cut / "manifest.json").read_text())
    assert not m["complete"] and 0 < len(m["shards"]) <= 5  # a prefix of whole rounds is listed
    assert m["shards"] == json.loads((cache_one / "manifest.json").read_text())["shards"][:len(m["shards"])]
    res = _cli(torchrun_argv(2, [*args, "--out", str(cut)]))  # rerun: finishes the cache
    assert res.stdout.count("harvested") == 1  # one summary line: rank 0's
    assert _files(cut) == _files(cache_one)


TRAIN = ["saeforge", "train", "--arch", "topk", "--width", "128", "--k", "4", "--tokens", str(12 * 256),
         "--batch-size", "256", "--lr", "1e-3", "--dtype", "float32", "--device", "cpu", "--log-every", "4",
         "--dead-tokens", "256", "--no-progress"]


@pytest.fixture(scope="module")
def train_one(cache_one, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "one"
    _in_process([*TRAIN[1:], "--data", str(cache_one), "--out", str(out)])
    return out


def test_cli_train_latent_sharded_matches_one_process(cache_one, train_one, tmp_path):
    _ranks(2, [*TRAIN, "--data", str(cache_one), "--shard-latents", "--out", str(tmp_path / "shard")])
    _close(train_one, tmp_path / "shard")


def test_two_nodes_on_localhost_train_the_one_process_sae(cache_one, train_one, tmp_path):
    """``torchrun --nnodes 2`` twice on this machine, meeting at a c10d rendezvous: data parallel over the two
    "nodes" trains the SAE one process trains; rank 0 alone reports and writes."""
    from saeforge.distributed.launch import free_port, wait_all

    endpoint = f"127.0.0.1:{free_port()}"
    args = [*TRAIN, "--data", str(cache_one), "--out", str(tmp_path / "run")]
    procs = []
    for node in range(2):
        argv = torchrun_argv(1, args, nnodes=2, rdzv_endpoint=endpoint, rdzv_id=f"t{os.getpid()}")
        log = open(tmp_path / f"node{node}.log", "w+")
        p = subprocess.Popen(argv, env=loopback_env(_env()), stdout=log, stderr=subprocess.STDOUT, text=True)
        p.log = log
        procs.append(p)
    results = wait_all(procs, timeout=240)
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    assert sum(r.stdout.count("saved") for r in results) == 1
    _close(train_one, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [4, 8, 12]  # one line per log step, not one per rank
    assert all("comm_s" in json.loads(l) for l in lines)


def test_distributed_eval_reduces_the_metrics_exactly(tmp_path, stories_model_path, tinystories_valid):
    """``eval`` under 2 processes: chunks split over the ranks, sums merged; the same results as one process."""
    import numpy as np

    from saeforge.sae import create_sae, make_config

    torch.manual_seed(0)
    create_sae(make_config("topk", d_in=64, d_sae=256, k=8, hook="resid_post.2", model=str(stories_model_path))
               ).save(tmp_path / "sae")
    args = ["eval", "--sae", str(tmp_path / "sae"), "--data", str(tinystories_valid), "--tokens", "4000",
            "--context-len", "64", "--batch-size", "8", "--chunk-batches", "2", "--device", "cpu", "--no-progress"]
    _in_process([*args, "--out", str(tmp_path / "one")])
    res = _ranks(2, ["saeforge", *args, "--out", str(tmp_path / "two")])
    assert sum(r.stdout.count("wrote") for r in res) == 1
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())

    def same(x, y, where):
        if isinstance(x, dict):
            assert set(x) == set(y), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        elif isinstance(x, float) and isinstance(y, float):
            assert y == pytest.approx(x, rel=1e-9, abs=1e-12), where
        else:
            assert x == y, where

    for section in ("reconstruction", "downstream", "features"):
        same(one[section], two[section], section)
    for f in ("features.npz", "per_token.npz"):
        a, b = np.load(tmp_path / "one" / f), np.load(tmp_path / "two" / f)
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-9, err_msg=k)
    assert not (tmp_path / "two" / "eval_chunks").exists()


@pytest.fixture(scope="module")
def two_disjoint(cache_one, tmp_path_factory):
    """2 ranks with --dp-read disjoint on a harvested cache: reads of one epoch, a run, a cut run and its resume."""
    root = tmp_path_factory.mktemp("disjoint")
    results = launch(2, [sys.executable, WORKER, str(root), "disjoint_reads", "disjoint_train", "disjoint_cut",
                         "disjoint_resume"], timeout=240, env={**_env(), "SAEFORGE_TEST_CACHE": str(cache_one)})
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stdout[-4000:]}"
    return root / "w2"


def test_disjoint_reads_read_every_shard_of_an_epoch_once(cache_one, two_disjoint):
    from saeforge.activations.cache import ActivationCache

    cache = ActivationCache(cache_one)
    parts = json.loads((two_disjoint / "disjoint_reads" / "reads.json").read_text())
    shards = [i for p in parts for i in p["shards"]]
    assert sorted(shards) == list(range(cache.n_shards)) and cache.n_shards >= 4  # each shard by one rank, once
    assert all(p["shards"] for p in parts)
    rows = [tuple(r) for p in parts for r in p["rows"]]
    assert len(set(rows)) == len(rows)  # no row handed out twice across the ranks
    steps = {p["steps"] for p in parts}
    assert steps == {parts[0]["max_steps"]}  # the ranks stay in step: full batches only, the same count
    assert len(rows) == parts[0]["max_steps"] * w.DB and len(rows) > cache.n_tokens - 2 * 512 - w.DB
    total = sum((cache.path / s["file"]).stat().st_size for s in cache.manifest["shards"])
    assert sum(p["bytes"] for p in parts) == total  # together the ranks read the cache once, not twice


def test_disjoint_reads_train_save_and_resume_with_the_same_replicas(cache_one, two_disjoint, tmp_path, monkeypatch):
    run = two_disjoint / "disjoint_train"
    assert (run / "sae.safetensors").exists()
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in lines][-1] == 12 * w.DB and lines[-1]["fvu"] < lines[0]["fvu"]
    _close(run, two_disjoint / "disjoint_resume")  # cut at step 6 and resumed on 2 ranks: the same SAE
    from saeforge.train.checkpoint import load_checkpoint

    meta, _, _ = load_checkpoint(two_disjoint / "disjoint_cut" / "checkpoint.safetensors")
    assert meta["step"] == 6 and meta["identity"]["train"]["dp_replicas"] == 2
    shutil.copy(two_disjoint / "disjoint_cut" / "checkpoint.safetensors", tmp_path / "checkpoint.safetensors")
    monkeypatch.setenv("SAEFORGE_TEST_CACHE", str(cache_one))  # resumed by one process: refused, one line
    with pytest.raises(SaeforgeError, match="resume with the same number of processes") as e:
        _resume_disjoint_on_one(two_disjoint, tmp_path)
    assert "\n" not in str(e.value)


def _resume_disjoint_on_one(two_disjoint, out):
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    cfg = w.train_cfg(12, batch_size=w.DB, total_tokens=12 * w.DB, init_tokens=256, dp_read="disjoint",
                      checkpoint_every=6)
    Trainer({"": make_config("topk", d_in=64, d_sae=128, k=4)}, w.cache_stream(), cfg, out).fit(resume=True,
                                                                                             progress=False)


def test_disjoint_reads_refuse_a_stream_that_is_not_a_cache(tmp_path):
    from saeforge.sae import make_config
    from saeforge.train import Trainer

    with pytest.raises(SaeforgeError, match="use --dp-read exact") as e:
        Trainer({"": make_config("topk", d_in=w.D, d_sae=32, k=2)}, w.stream(), w.train_cfg(2, dp_read="disjoint"),
                tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(SaeforgeError, match="dp_read"):
        w.train_cfg(2, dp_read="sometimes")


# ---- pieces that need no process group ---------------------------------------------------------------------
def test_without_a_process_group_every_helper_is_a_no_op():
    from saeforge import distributed as dist

    assert not dist.active() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    t = torch.arange(4.0)
    assert dist.all_reduce(t) is t and torch.equal(t, torch.arange(4.0))
    assert dist.all_gather(t)[0] is t and dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast(t) is t and dist.broadcast_object(3) == 3
    m = dist.Mesh.build(0)
    assert (m.replicas, m.shards, m.data.size, m.shard.size) == (1, 1, 1, 1)


def test_row_split_and_sae_placement():
    from saeforge.activations.stream import RankSlice
    from saeforge.distributed import split_bounds
    from saeforge.train.parallel import place

    parts = [split_bounds(10, i, 3) for i in range(3)]
    assert parts == [(0, 4), (4, 7), (7, 10)]
    s = w.stream()
    full = next(iter(s))
    got = [next(iter(RankSlice(s, i, 3))) for i in range(3)]
    assert torch.equal(torch.cat([g.acts["synthetic"] for g in got]), full.acts["synthetic"])
    assert all(g.global_rows == w.B for g in got)
    # sparsify's distribute_modules needs len(modules) % world == 0; here any count goes, largest first
    owner = place({"a": 4, "b": 2, "c": 2, "d": 1, "e": 1}, 3)
    assert sorted(owner) == ["a", "b", "c", "d", "e"] and set(owner.values()) == {0, 1, 2}
    load = [sum(v for n, v in {"a": 4, "b": 2, "c": 2, "d": 1, "e": 1}.items() if owner[n] == p) for p in range(3)]
    assert max(load) == 4 and min(load) >= 2
    assert set(place({"x": 1}, 4).values()) == {0}
