"""The CUDA paths, one test each (marked ``cuda``; skipped cleanly without a GPU, as in CI).

``bash benchmarks/gpu_check.sh`` runs these (``pytest -m cuda``) together with the Triton-against-torch test
of tests/test_sparse_kernels.py and a bf16 training benchmark: one call checks a GPU machine.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")


def _close(a, b, tol):
    return (a.float().cpu() - b.float().cpu()).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_sparse_kernels_on_cuda_match_dense(arch):
    from saeforge.sae import create_sae, make_config
    from saeforge.sae.base import TrainStepInput

    torch.manual_seed(0)
    kw = {"k": 8, "k_aux": 64} if arch != "jumprelu" else {}
    cfg = make_config(arch, d_in=64, d_sae=1024, **kw)
    a = create_sae(cfg).cuda()
    b = create_sae(cfg).cuda()
    b.load_state_dict(a.state_dict())
    b.sparse_kernels = False
    x = torch.randn(256, 64, device="cuda")
    dead = torch.zeros(1024, dtype=torch.bool, device="cuda")
    dead[::5] = True
    inp = TrainStepInput(x, x, 3, 10, dead)
    oa, ob = a.training_forward(inp), b.training_forward(inp)
    assert _close(oa.loss, ob.loss, 1e-4) and _close(oa.y_hat, ob.y_hat, 1e-4)
    oa.loss.backward()
    ob.loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert _close(p.grad, q.grad, 1e-4), n


def test_trainer_on_cuda_matches_cpu_fp32_and_runs_bf16(tmp_path):
    from saeforge.sae import make_config
    from saeforge.synthetic import SuperpositionStream
    from saeforge.train import TrainConfig, Trainer

    cfg = make_config("topk", d_in=32, d_sae=512, k=8, k_aux=64)
    out = {}
    for dev, dt in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        tc = TrainConfig(total_tokens=20 * 256, batch_size=256, lr=1e-3, dead_tokens=512, log_every=5,
                         checkpoint_every=0, device=dev, dtype=dt, init_tokens=1024)
        s = SuperpositionStream(d=32, n_features=128, p=0.05, batch_size=256, seed=1)
        Trainer({"": cfg}, s, tc, tmp_path / f"{dev}_{dt}").fit(progress=False)
        out[(dev, dt)] = load_file(str(tmp_path / f"{dev}_{dt}" / "sae.safetensors"))
    for k, v in out[("cpu", "float32")].items():
        assert _close(v, out[("cuda", "float32")][k], 1e-3), k
    last = json.loads((tmp_path / "cuda_bfloat16" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["fvu"] < 1.0 and all(torch.isfinite(t).all() for t in out[("cuda", "bfloat16")].values())


def test_harvest_and_live_stream_on_cuda_in_bf16(tmp_path, stories_model_path, tinystories_train):
    from saeforge.activations.cache import ActivationCache, HarvestConfig, harvest
    from saeforge.activations.stream import LiveStream

    cfg = HarvestConfig(model=str(stories_model_path), data=str(tinystories_train), hooks=["resid_post.2"],
                        out=str(tmp_path / "c"), max_tokens=2000, context_len=32, device="cuda", model_dtype="bfloat16")
    harvest(cfg, progress=False)
    cache = ActivationCache(tmp_path / "c")
    assert cache.n_tokens == 2000 and cache.manifest["config"]["model_dtype"] == "bfloat16"
    live = LiveStream(str(stories_model_path), ["resid_post.2"], str(tinystories_train), batch_size=256,
                      context_len=32, max_tokens=2000, device="cuda")
    b = next(iter(live))
    assert b.acts["resid_post.2"].is_cuda and b.acts["resid_post.2"].shape == (256, 64)


def test_eval_on_cuda(tmp_path, stories_model_path, tinystories_valid):
    from saeforge.sae import create_sae, make_config

    sae = create_sae(make_config("topk", d_in=64, d_sae=256, k=8, hook="resid_post.2", model=str(stories_model_path)))
    sae.save(tmp_path / "sae")
    from saeforge.cli import main

    assert main(["eval", "--sae", str(tmp_path / "sae"), "--data", str(tinystories_valid), "--device", "cuda",
                 "--model-dtype", "bfloat16", "--tokens", "2000", "--out", str(tmp_path / "eval")]) == 0


@two_gpus
def test_nccl_data_parallel_and_latent_sharding_match_one_gpu(tmp_path):
    """The gloo equivalence scenarios of tests/test_distributed.py on two GPUs with NCCL."""
    import os

    from saeforge.distributed.launch import launch

    sys.path.insert(0, str(Path(__file__).parent))
    import dist_worker as w

    os.environ["SAEFORGE_TEST_DEVICE"] = "cuda"
    w.DEVICE = "cuda"
    try:
        w._train("topk", tmp_path / "one")
        res = launch(2, [sys.executable, str(Path(__file__).with_name("dist_worker.py")), str(tmp_path / "two"),
                         "dp_topk", "shard_topk"], timeout=300,
                     env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        os.environ.pop("SAEFORGE_TEST_DEVICE", None)
        w.DEVICE = "cpu"
    for r in res:
        assert r.returncode == 0, r.stdout[-3000:]
    ref = load_file(str(tmp_path / "one" / "sae.safetensors"))
    for sc in ("dp_topk", "shard_topk"):
        got = load_file(str(tmp_path / "two" / "w2" / sc / "sae.safetensors"))
        for k in ref:
            assert _close(ref[k], got[k], 1e-4), (sc, k)


def test_device_map_places_an_hf_model(tmp_path, stories_model_path):
    """--device-map auto (accelerate) on an HF copy of stories260K: the forward runs on the GPU(s)."""
    pytest.importorskip("accelerate")
    from saeforge.models import load_model
    from saeforge.models.llama2c import save_hf

    save_hf(load_model(str(stories_model_path)), tmp_path / "hf")
    lm = load_model(str(tmp_path / "hf"), device_map="auto", dtype=torch.bfloat16)
    assert next(lm.model.parameters()).is_cuda
    ids = torch.tensor([[1, 20, 30, 40]])
    assert lm.logits(ids).shape[-1] == lm.model.get_input_embeddings().num_embeddings


def _hf_stories_and_sae(tmp_path, stories_model_path):
    from saeforge.models import load_model
    from saeforge.models.llama2c import save_hf
    from saeforge.sae import create_sae, make_config

    hf = save_hf(load_model(str(stories_model_path)), tmp_path / "hf")
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook="resid_post.3", model=str(hf)))
    return hf, str(sae.save(tmp_path / "sae"))


@two_gpus
def test_eval_with_device_map_over_two_gpus_matches_one_gpu(tmp_path, stories_model_path, tinystories_valid):
    """eval --device-map balanced: layers on both GPUs (the SAE's hook on the second), the one-GPU metrics."""
    pytest.importorskip("accelerate")
    from saeforge.eval.api import evaluate_many
    from saeforge.eval.sources import eval_model

    hf, sae = _hf_stories_and_sae(tmp_path, stories_model_path)
    lm = eval_model(str(hf), {}, None, "cuda", "float32", "balanced")
    assert len({str(d) for d in lm.model.hf_device_map.values()}) >= 2, lm.model.hf_device_map
    kw = dict(data=str(tinystories_valid), n_tokens=2000, context_len=64, batch_contexts=4, progress=False)
    one = evaluate_many([sae], device="cuda", **kw)["saes"]
    mapped = evaluate_many([sae], model=lm, **kw)["saes"]
    (name,) = one
    for sec in ("reconstruction", "downstream"):
        for k, v in one[name][sec].items():
            if isinstance(v, float):
                assert mapped[name][sec][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), (sec, k)


@two_gpus
def test_adapt_with_device_map_over_two_gpus_matches_one_gpu(tmp_path, stories_model_path, tinystories_valid):
    """adapt --device-map balanced: LoRA on layers of both GPUs, the SAE's splice across them; the one-GPU KLs."""
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    from saeforge.adapt import AdaptConfig, build, fit

    hf, sae = _hf_stories_and_sae(tmp_path, stories_model_path)
    kls = {}
    for dm in (None, "balanced"):
        cfg = AdaptConfig(model=str(hf), saes=[sae], data=str(tinystories_valid), rank=4, tokens=4 * 64 * 4,
                          batch_contexts=4, context_len=64, log_every=1, checkpoint_every=0, device="cuda",
                          dropout=0.0, device_map=dm)
        ad = build(cfg)
        if dm is not None:
            devs = {p.device for p in ad.loaded.model.parameters()}
            assert len(devs) >= 2, devs
        kls[dm] = [r["kl"] for r in fit(ad, cfg, tmp_path / f"run_{dm}", progress=False)]
    assert kls["balanced"] == pytest.approx(kls[None], rel=1e-3)
