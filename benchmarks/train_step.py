#!/usr/bin/env python
"""Training-step throughput of a TopK SAE against this machine's matrix-product peak (issue 7).

For each configuration (d, m, k, batch, dtype) it prints one JSON line with tokens/s, the achieved
GFLOP/s counting only the unavoidable encoder product (2·d·m FLOPs per token), that figure as a
fraction of the machine's peak for a ``[batch, d] × [d, m]`` product in the same dtype (measured in
the same process right before each repeat), the step-time breakdown (encode, topk, decode, backward,
optimizer; backward is split into the encoder's and decoder's sparse gradients and the rest, the optimizer into the
decoder-gradient projection, the gradient norm (and clip, under Adam), the optimizer step and the decoder
renormalisation) and the
peak RSS. Each configuration runs in its own subprocess so the RSS figures do not mix; the subprocess
gets ``OMP_WAIT_POLICY=PASSIVE`` unless told otherwise (``--omp-wait-policy``): on a machine shared with
other jobs, spinning OpenMP workers waste the time slices that the busy ones need (docs/performance.md).

A step is the trainer's step (``Trainer._step``): training forward under autocast, backward, the
decoder-gradient projection, gradient clipping, Adam, LR schedule, decoder renormalisation, dead-latent
counters and on-device metric accumulation.

``--impl sparse``  ``TopKSAE.training_forward`` as the trainer runs it by default (``TrainConfig.kernels =
"sparse"``: the kernels of ``saeforge.kernels``) + the trainer's optimizer (``--optimizer signum``, TopK's default:
schedule-free sign descent; ``--optimizer adam``: the fused Adam of ``make_adam``);
``--impl reference``  the dense autograd path (``kernels = "dense"``, ``training_forward_with(sparse=False)``) + the
unfused Adam, for comparison.

bf16 on a CPU without AMX / AVX512-BF16 runs a scalar fallback hundreds of times slower than fp32, so
those configurations are not run: a ``"skipped"`` record carries the measured bf16 and fp32 peaks of a
small product instead (``--force-bf16`` runs them anyway).

    python benchmarks/train_step.py                         # the whole grid, time-capped
    python benchmarks/train_step.py --d 768 --mult 21.333 --batch 4096 --dtype fp32   # m = 16384
    python benchmarks/train_step.py --d 768 --m 16384 --batch 4096 --dtype fp32 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(B: int, d: int, m: int, dtype, device, cap_s: float, reps: int = 3) -> tuple[float, dict]:
    """Best GFLOP/s of ``[B, d] @ [d, m]`` in ``dtype`` over up to ``reps`` runs within ``cap_s`` seconds."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(B, d, generator=g).to(device, dtype)
    w = torch.randn(d, m, generator=g).to(device, dtype)
    out = torch.empty(B, m, device=device, dtype=dtype)
    times = []
    t_start = time.perf_counter()
    for i in range(reps + 1):  # run 0 warms up (first-touch of the output, weight packing)
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, w, out=out)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > cap_s:
            break
    best = min(times[1:] or times)
    return 2.0 * B * d * m / best / 1e9, {"shape": [B, d, m], "runs": len(times), "best_s": round(best, 5)}


def _lap(prof: dict | None, key: str, device, t0: float) -> float:
    """Add the seconds since ``t0`` to ``prof[key]`` (when profiling); returns now."""
    _sync(device)
    t1 = time.perf_counter()
    if prof is not None:
        prof[key] = prof.get(key, 0.0) + (t1 - t0)
    return t1


OPT_PARTS = ("opt_project", "opt_clip", "opt_step", "opt_renorm")


def _phase_times(prof: dict, t_fwd: float, t_bwd: float, t_opt: float) -> dict:
    enc, topk = prof.get("encode", 0.0), prof.get("topk", 0.0)
    be, bd = prof.get("bwd_encoder", 0.0), prof.get("bwd_decoder", 0.0)
    parts = {k: prof.get(k, 0.0) for k in OPT_PARTS}
    return {"encode": enc, "topk": topk, "decode": max(0.0, t_fwd - enc - topk), "backward": t_bwd,
            "backward_encoder_grad": be, "backward_decoder_grad": bd,
            "backward_other": max(0.0, t_bwd - be - bd), "optimizer": t_opt, **parts,
            "opt_other": max(0.0, t_opt - sum(parts.values()))}


def run_config(c: dict) -> dict:
    import torch

    from saeforge.device import cpu_has_fast_bf16, resolve_device
    from saeforge.kernels import topk_autograd
    from saeforge.kernels.allocator import tune_cpu_allocator
    from saeforge.sae import TrainStepInput, create_sae, fvu, make_config
    from saeforge.train.optim import ScheduleFreeSign
    from saeforge.train.trainer import make_adam

    if c.get("threads"):
        torch.set_num_threads(c["threads"])
    malloc_tuned = bool(c["tune_malloc"]) and tune_cpu_allocator()
    device = resolve_device(c["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c["dtype"]]
    d, m, k, B = c["d"], c["m"], c["k"], c["batch"]
    rec = {"arch": c.get("arch", "topk"), "d": d, "m": m, "k": k, "batch": B, "dtype": c["dtype"], "impl": c["impl"], "device": str(device),
           "threads": torch.get_num_threads()}
    native_bf16 = device.type == "cuda" or cpu_has_fast_bf16()
    if dtype == torch.bfloat16 and not native_bf16 and not c["force_bf16"]:
        # ~0.5-1 GFLOP: one to two seconds at the scalar fallback's speed
        cols = min(m, 2048)
        small = (min(B, max(256, int(0.5e9 / (2 * d * cols)))), d, cols)
        bf, bf_info = measure_peak(*small, torch.bfloat16, device, cap_s=c["bf16_cap"], reps=2)
        f32, _ = measure_peak(*small, torch.float32, device, cap_s=c["bf16_cap"], reps=3)
        rec.update(skipped="no native bf16 on this CPU (no AMX / AVX512-BF16): bf16 matmuls use a scalar "
                   "fallback", bf16_peak_gflops=round(bf, 3), fp32_peak_gflops_same_problem=round(f32, 2),
                   bf16_over_fp32=round(bf / f32, 5), peak_problem=bf_info)
        return rec

    torch.manual_seed(0)
    cfg = make_config(c.get("arch", "topk"), d_in=d, d_sae=m, k=k)
    sae = create_sae(cfg, device=device)
    sparse = c["impl"] == "sparse"
    sae.sparse_kernels = sparse
    fused = c["adam"] == "fused" or (c["adam"] == "auto" and sparse)
    if c["optimizer"] == "signum":
        opt = ScheduleFreeSign(sae.parameters(), 1e-4)
    else:
        opt = make_adam(sae.parameters(), 1e-4, (0.9, 0.999), 6.25e-10, fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    since = torch.zeros(m, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, d, generator=gen).to(device) for _ in range(2)]
    dead_n = int(round(c["dead_frac"] * m))
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    dead[torch.randperm(m, generator=gen)[:dead_n].to(device)] = True
    if dead_n == 0:  # the trainer passes no mask while no latent can be dead (AuxK skipped)
        dead = None
    acc: dict[str, torch.Tensor] = {}
    if c.get("chunk_rows"):
        topk_autograd.set_chunk_elements(c["chunk_rows"] * m)

    def step(i: int, prof: dict | None) -> tuple[float, float, float]:
        topk_autograd.PROFILE = prof
        x = xs[i % 2]
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = sae.training_forward(TrainStepInput(x, x, i, 10**6, dead))
        _sync(device)
        t1 = time.perf_counter()
        out.loss.float().backward()
        _sync(device)
        t2 = time.perf_counter()
        sae.before_optimizer_step()
        t = _lap(prof, "opt_project", device, t2)
        if c["optimizer"] == "signum":  # as the trainer: the norm only (a positive factor cannot change a sign)
            torch.nn.utils.get_total_norm([p.grad for p in sae.parameters() if p.grad is not None])
        else:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        t = _lap(prof, "opt_clip", device, t)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t = _lap(prof, "opt_step", device, t)
        sae.after_optimizer_step(i, 10**6)
        t = _lap(prof, "opt_renorm", device, t)
        since.add_(B)
        since.masked_fill_(out.fired, 0)
        with torch.no_grad():
            parts = {"loss": out.loss.float(), "fvu": fvu(out.y.float(), out.y_hat.float()), "l0": out.l0.float()}
            for key, v in parts.items():
                acc[key] = acc[key] + v if key in acc else v.clone()
        _sync(device)
        t3 = time.perf_counter()
        topk_autograd.PROFILE = None
        return t1 - t0, t2 - t1, t3 - t2

    t_begin = time.perf_counter()
    step(0, None)  # warm-up: allocations, Adam state
    repeats = []
    for r in range(c["repeats"]):
        peak, peak_info = measure_peak(B, d, m, dtype, device, cap_s=c["peak_cap"])
        best = None
        for s in range(c["steps"]):
            prof: dict[str, float] = {}
            tf, tb, to = step(1 + r * c["steps"] + s, prof)
            total = tf + tb + to
            if best is None or total < best[0]:
                best = (total, _phase_times(prof, tf, tb, to))
        repeats.append({"peak_gflops": peak, "step_s": best[0], "phases": best[1]})
        if time.perf_counter() - t_begin > c["time_cap"]:
            break
    flops = 2.0 * d * m * B
    best_rep = min(repeats, key=lambda r: r["step_s"])
    peak_best = max(r["peak_gflops"] for r in repeats)
    achieved = flops / best_rep["step_s"] / 1e9
    rec.update(
        tokens_per_s=round(B / best_rep["step_s"], 1),
        step_s=round(best_rep["step_s"], 4),
        achieved_gflops=round(achieved, 2),
        peak_gflops=round(peak_best, 2),
        frac_of_peak=round(achieved / peak_best, 4),
        frac_of_peak_per_repeat=[round(flops / r["step_s"] / 1e9 / r["peak_gflops"], 4) for r in repeats],
        breakdown_s={k2: round(v, 4) for k2, v in best_rep["phases"].items()},
        repeats=len(repeats),
        steps_per_repeat=c["steps"],
        optimizer=c["optimizer"],
        adam="fused" if opt.defaults.get("fused") else "default",
        dead_frac=c["dead_frac"],
        final_loss=round(float(acc["loss"] / (1 + len(repeats) * c["steps"])), 5),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        native_bf16=native_bf16,
        malloc_tuned=malloc_tuned,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
    )
    return rec


def configs(a: argparse.Namespace) -> list[dict]:
    out = []
    for d in a.d:
        ms = a.m if a.m else [int(round(x * d)) for x in a.mult]
        for m in ms:
            for B in a.batch:
                for dt in a.dtype:
                    for impl in a.impl:
                        out.append({"d": d, "m": m, "k": a.k, "batch": B, "dtype": dt, "impl": impl, "arch": a.arch,
                                    "device": a.device, "repeats": a.repeats, "steps": a.steps,
                                    "time_cap": a.time_cap, "peak_cap": a.peak_cap, "bf16_cap": a.bf16_cap,
                                    "force_bf16": a.force_bf16, "threads": a.threads, "adam": a.adam,
                                    "optimizer": a.optimizer,
                                    "dead_frac": a.dead_frac, "chunk_rows": a.chunk_rows,
                                    "tune_malloc": not a.no_malloc_tuning})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[64, 384, 768])
    p.add_argument("--mult", type=float, nargs="+", default=[16, 32], help="m = mult·d (ignored with --m)")
    p.add_argument("--m", type=int, nargs="+", default=None, help="explicit latent counts")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--arch", choices=["topk", "batchtopk"], default="topk",
                   help="TopK (Gao et al.) or BatchTopK (same sparse encoder, batch-wide selection)")
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--impl", nargs="+", choices=["sparse", "reference"], default=["sparse"])
    p.add_argument("--optimizer", choices=["adam", "signum"], default="signum",
                   help="the optimizer of the step: signum (schedule-free sign descent, the trainer's default for "
                        "TopK; saeforge/train/optim.py) or adam (the paper's)")
    p.add_argument("--adam", choices=["auto", "default", "fused"], default="auto",
                   help="auto: fused for --impl sparse (the trainer's default), unfused for reference")
    p.add_argument("--dead-frac", type=float, default=0.0, help="share of latents marked dead (AuxK cost)")
    p.add_argument("--chunk-rows", type=int, default=None, help="encoder chunk rows (default: auto)")
    p.add_argument("--repeats", type=int, default=3, help="repeats, each after a fresh peak measurement")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat (best counts)")
    p.add_argument("--time-cap", type=float, default=90.0, help="seconds per configuration before stopping repeats")
    p.add_argument("--peak-cap", type=float, default=20.0, help="seconds per peak measurement")
    p.add_argument("--bf16-cap", type=float, default=10.0, help="seconds for the small bf16 peak probe")
    p.add_argument("--force-bf16", action="store_true", help="run bf16 configurations even without native bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "inherit"], default="PASSIVE",
                   help="OMP_WAIT_POLICY of the runs (PASSIVE: idle threads sleep instead of spinning, which "
                        "is what a machine shared with other jobs needs; inherit: leave the environment alone)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's mmap threshold alone (see saeforge/kernels/allocator.py)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_config(json.loads(a.one))), flush=True)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if a.omp_wait_policy != "inherit":  # read by the OpenMP runtime at start-up, hence set for the child
        env["OMP_WAIT_POLICY"] = a.omp_wait_policy
    for c in configs(a):
        timeout = c["time_cap"] * 4 + 600
        try:
            r = subprocess.run([sys.executable, __file__, "--one", json.dumps(c)], capture_output=True, text=True,
                               timeout=timeout, env=env)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode != 0 or not lines:
                err = (r.stderr.strip().splitlines() or ["no output"])[-1]
                print(json.dumps({**{k: c[k] for k in ("d", "m", "k", "batch", "dtype", "impl")}, "error": err}), flush=True)
            else:
                print(lines[-1], flush=True)
        except subprocess.TimeoutExpired:
            print(json.dumps({**{k: c[k] for k in ("d", "m", "k", "batch", "dtype", "impl")},
                              "error": f"timed out after {timeout:.0f} s"}), flush=True)


if __name__ == "__main__":
    main()
