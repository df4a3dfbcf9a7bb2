"""Row-wise top-k on CPU: ``saeforge.kernels.topk_rows`` against ``torch.topk``, one JSON line per shape.

The rows are pre-activations of a random encoder (``x @ W + b``, d = 64), not i.i.d. noise, so the groups'
maxima are spread as in an SAE. Each line has the best and median seconds over ``--repeats`` calls of each, their
ratio, and whether both selected the same multiset of values (they must: ``topk_rows`` is exact).

    python benchmarks/topk_select.py                       # B = 4096; m, k = (16384, 32), (16384, 128), (1024, 32)
    python benchmarks/topk_select.py --shapes 4096x6144x32 --repeats 21

Run it alone (a parallel job on 2 cores slows each call many times over).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from saeforge.kernels.select import group_size, topk_rows  # noqa: E402


def _times(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[0], ts[len(ts) // 2]


def measure(B: int, m: int, k: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(B, 64, generator=g), torch.randn(64, m, generator=g) / 8
    h = torch.addmm(0.1 * torch.randn(m, generator=g), x, W)
    same = torch.equal(topk_rows(h, k)[0].sort(-1).values, h.topk(k).values.sort(-1).values)
    ours, ref = _times(lambda: topk_rows(h, k), repeats), _times(lambda: h.topk(k, sorted=False), repeats)
    return {"B": B, "m": m, "k": k, "group": group_size(m, k, "cpu"), "threads": torch.get_num_threads(),
            "topk_rows_s": round(ours[0], 5), "topk_rows_median_s": round(ours[1], 5),
            "torch_topk_s": round(ref[0], 5), "torch_topk_median_s": round(ref[1], 5),
            "speedup": round(ref[0] / ours[0], 3), "same_values": same}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4096x16384x32", "4096x16384x128", "4096x1024x32"],
                   help="BxMxK: rows, row width (latents), k")
    p.add_argument("--repeats", type=int, default=11, help="timed calls of each per shape")
    a = p.parse_args(argv)
    for shape in a.shapes:
        try:
            B, m, k = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            p.error(f"--shapes: {shape!r} is not BxMxK (e.g. 4096x16384x32)")
        print(json.dumps(measure(B, m, k, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
