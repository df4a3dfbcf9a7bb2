#!/usr/bin/env python
"""SAE quality per unit of compute, saeforge against the peer libraries on the very same batches.

Trains a TopK SAE (k = 32, width 16·d, batch 4096 by default) on each fixed activation set of
``quality_data.py`` (stories260K block-2 residuals, MiniLM layer-3 residuals, a seeded toy superposition set)
at a fixed token budget and prints one JSON line per (library, set): held-out FVU, inference L0 (of the SAE
as saved and loaded again), dead % (latents that never fire on the 65,536 held-out rows), tokens/s of the
training loop, and for the toy set the share of true directions recovered at cosine > 0.9.

With ``--peers`` it also runs SAELens, sparsify and dictionary_learning (one subprocess per library, each
at its own documented defaults; ``quality_peers.py``) with the interpreter given by ``--peer-python`` (they
are installed by the ``bench`` extra, never needed by saeforge itself), then prints one summary line with
the ratios saeforge / best peer.

    python benchmarks/quality.py                               # saeforge only, all three sets, 3M tokens
    python benchmarks/quality.py --sets stories --tokens 3M --set optimizer=adam
    python benchmarks/quality.py --peers --peer-python /path/to/venv/bin/python
    python benchmarks/quality.py --sets toy --tokens 10M        # the recovery target
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import quality_data as qd  # noqa: E402

from saeforge.activations.stream import ActivationBatch, Stream  # noqa: E402
from saeforge.config import parse_size  # noqa: E402
from saeforge.sae import make_config  # noqa: E402
from saeforge.sae.base import SAE  # noqa: E402
from saeforge.train import TrainConfig  # noqa: E402
from saeforge.train.trainer import Trainer  # noqa: E402

PEERS = ("saelens", "sparsify", "dictionary_learning")
HOOK = "x"


class TensorStream(Stream):
    """The benchmark's global batch order as a saeforge activation stream."""

    def __init__(self, name: str, train: torch.Tensor | None, batch_size: int, total_tokens: int, seed: int):
        self.name, self.train, self.batch_size, self.total, self.seed = name, train, batch_size, total_tokens, seed
        self.hooks, self.d = [HOOK], {HOOK: qd.D[name]}

    def iterate(self, skip_batches: int = 0):
        for i, b in enumerate(qd.batches(self.name, self.train, self.batch_size, self.total, self.seed)):
            if i >= skip_batches:
                yield ActivationBatch({HOOK: b})

    def __iter__(self):
        return self.iterate(0)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_saeforge(args, name: str, tokens: int) -> dict:
    train, held = qd.load(name, args.data)
    d = qd.D[name]
    sae_kw = {"d_in": d, "d_sae": args.width_mult * d, "hook": HOOK}
    if args.arch in ("topk", "batchtopk", "matryoshka"):
        sae_kw["k"] = args.k
    train_kw = {"total_tokens": tokens, "batch_size": args.batch, "dtype": args.dtype, "log_every": 50,
                "checkpoint_every": 0, "seed": args.seed}
    for kv in args.set:
        key, val = kv.split("=", 1)
        (train_kw if key in TrainConfig.__dataclass_fields__ else sae_kw)[key] = _value(val)
    cfg = make_config(args.arch, **sae_kw)
    tcfg = TrainConfig(**train_kw)
    stream = TensorStream(name, train, args.batch, tokens, args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = str(args.keep / name) if args.keep else scratch  # --keep: the run folder outlives the benchmark
        trainer = Trainer({"": cfg}, stream, tcfg, run_dir)
        t0 = time.perf_counter()
        trainer.fit(progress=not args.quiet)
        secs = time.perf_counter() - t0
        sae = SAE.load(run_dir)  # what the user gets: the saved SAE, not the object in memory
        last = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")][-1]
    sae.eval()
    rec = {"lib": "saeforge", "set": name, "arch": args.arch, "tokens": tokens, "d_in": d,
           "d_sae": cfg.d_sae, "k": args.k, "lr": trainer.runs[""].opt.param_groups[0]["initial_lr"],
           "dtype": args.dtype, "train_fvu_last": round(last["fvu"], 5), "train_l0_last": round(last["l0"], 3)}
    rec.update({k: round(v, 5) for k, v in qd.heldout_metrics(sae.encode, sae.decode, held).items()})
    if name == "toy":
        rec["recovered"] = round(qd.recovered(qd.toy_directions(), sae.W_dec.detach()), 4)
    rec["tokens_per_s"] = round(tokens / secs, 1)
    rec["threads"] = torch.get_num_threads()
    if args.set:
        rec["overrides"] = args.set
    return rec


def run_peer(args, lib: str, name: str, tokens: int) -> dict:
    cmd = [args.peer_python, str(HERE / "quality_peers.py"), "--lib", lib, "--set", name, "--tokens", str(tokens),
           "--k", str(args.k), "--width-mult", str(args.width_mult), "--batch", str(args.batch),
           "--seed", str(args.seed), "--data", str(args.data)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"lib": lib, "set": name, "tokens": tokens, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def render(paths: list[str]) -> str:
    """A markdown table (one row per set and library, with the ratio to the best peer) from JSON-line outputs
    of earlier runs (e.g. saeforge's and the peers' run in separate processes)."""
    recs = [json.loads(ln) for p in paths for ln in open(p) if ln.startswith("{") and '"lib"' in ln]
    recs = [r for r in recs if "fvu" in r and not r.get("overrides") and r.get("arch", "topk") == "topk"]
    out = ["| set | library | tokens | FVU | L0 | dead % | recovered | tokens/s | FVU / best peer |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in qd.SETS:
        rows = [r for r in recs if r["set"] == name]
        peers = [r for r in rows if r["lib"] != "saeforge"]
        best = min((r["fvu"] for r in peers), default=None)
        for r in sorted(rows, key=lambda r: (r["lib"] != "saeforge", r["lib"], r["tokens"])):
            ratio = f"{r['fvu'] / best:.2f}" if best else "-"
            rec = f"{100 * r['recovered']:.1f} %" if "recovered" in r else "-"
            out.append(f"| {name} | {r['lib']} | {r['tokens'] / 1e6:.0f}M | {r['fvu']:.4f} | {r['l0']:.1f} | "
                       f"{r['dead_pct']:.2f} | {rec} | {r['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="stories,toy,minilm", help="comma list of stories, toy, minilm")
    ap.add_argument("--tokens", default="3M", help="training tokens per set (e.g. 3M, 10M)")
    ap.add_argument("--arch", default="topk", help="saeforge architecture")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--width-mult", type=int, default=16, help="d_sae = width_mult · d_in")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", help="saeforge autocast dtype (peers run float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an SAE-config or TrainConfig field of saeforge's run (repeatable)")
    ap.add_argument("--data", type=Path, default=qd.REPO / "runs" / "quality_data", help="where the sets are built")
    ap.add_argument("--peers", action="store_true", help="also run SAELens, sparsify and dictionary_learning")
    ap.add_argument("--peer-libs", default=",".join(PEERS))
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter that has the peer libraries")
    ap.add_argument("--no-saeforge", action="store_true", help="run the peers only")
    ap.add_argument("--keep", type=Path, help="keep saeforge's run folder of each set as KEEP/<set> (for "
                    "benchmarks/magnitudes.py or `saeforge eval`)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="print the markdown table of earlier runs' outputs")
    args = ap.parse_args(argv)
    if args.render:
        print(render(args.render))
        return
    tokens = parse_size(args.tokens)
    if args.keep and not args.no_saeforge:
        for name in args.sets.split(","):
            if (args.keep / name).exists() and any((args.keep / name).iterdir()):
                ap.error(f"--keep: {args.keep / name} is not empty (it would resume an earlier run and time only "
                         f"its rest); pass a new folder")
    results = []
    for name in args.sets.split(","):
        if name != "toy":
            qd.build(name, args.data)
        if not args.no_saeforge:
            results.append(run_saeforge(args, name, tokens))
            print(json.dumps(results[-1]), flush=True)
        if args.peers:
            for lib in args.peer_libs.split(","):
                results.append(run_peer(args, lib, name, tokens))
                print(json.dumps(results[-1]), flush=True)
    if args.peers and not args.no_saeforge:
        summary = {"summary": "saeforge / best peer (fvu: lower is better; tokens/s: higher is better)"}
        for name in args.sets.split(","):
            ours = next(r for r in results if r["lib"] == "saeforge" and r["set"] == name)
            peers = [r for r in results if r["lib"] != "saeforge" and r["set"] == name and "fvu" in r]
            if peers:
                best = min(peers, key=lambda r: r["fvu"])
                fast = max(peers, key=lambda r: r["tokens_per_s"])
                summary[name] = {"fvu_ratio": round(ours["fvu"] / best["fvu"], 3), "best_peer": best["lib"],
                                 "speed_ratio": round(ours["tokens_per_s"] / fast["tokens_per_s"], 2),
                                 "fastest_peer": fast["lib"]}
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
