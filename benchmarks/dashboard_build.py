"""Time ``saeforge dashboard build`` for a TopK SAE (width 1024) on all of TinyStories train.txt (~465k tokens).

Setup (not timed, reused between runs): harvest resid_post.2 of stories260K on train.txt into OUT/cache and
train a TopK SAE on it into OUT/sae. Timed: a full dashboard build (a) from the text, running the model, and
(b) from the activation cache. Prints one JSON object. With ``--screenshots DIR`` it also serves the text
build and saves the index and one latent page as PNG (headless Chromium via Playwright).

    python benchmarks/dashboard_build.py --screenshots docs/img
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared data folder")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_dashboard"), help="work folder")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--train-tokens", default="600k", help="training tokens for the SAE (setup, not timed)")
    ap.add_argument("--max-tokens", default=None, help="cap the dashboard's tokens (default: all of train.txt)")
    ap.add_argument("--skip-cache-build", action="store_true", help="time only the build from text")
    ap.add_argument("--screenshots", help="folder for dashboard_index.png and dashboard_latent.png")
    args = ap.parse_args()

    import torch

    from saeforge.activations.cache import HarvestConfig, harvest
    from saeforge.activations.stream import CachedStream
    from saeforge.config import parse_size
    from saeforge.dashboard import DashboardConfig, build_dashboard, read_payload
    from saeforge.sae import make_config
    from saeforge.train import TrainConfig, Trainer

    shared, out = Path(args.shared), Path(args.out)
    model = shared / "models" / "stories260K" / "stories260K.bin"
    text = shared / "data" / "tinystories" / "train.txt"
    hook = "resid_post.2"
    max_tokens = parse_size(args.max_tokens) if args.max_tokens else None

    t = time.perf_counter()
    cache = harvest(HarvestConfig(model=str(model), data=str(text), hooks=[hook], out=str(out / "cache"),
                                  max_tokens=max_tokens))
    sae_dir = out / f"sae_{args.width}"
    if not (sae_dir / "sae.safetensors").exists():
        cfg = make_config("topk", d_in=64, d_sae=args.width, k=args.k, hook=hook, model=str(model))
        stream = CachedStream(cache, batch_size=4096, shuffle_buffer=65536)
        Trainer({"": cfg}, stream, TrainConfig(total_tokens=parse_size(args.train_tokens), dead_tokens=500_000,
                                               device="cpu"), sae_dir).fit()
    setup_s = time.perf_counter() - t

    result = {"width": args.width, "k": args.k, "model": "stories260K", "hook": hook, "setup_s": round(setup_s, 1),
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    runs = [("text", str(text))] + ([] if args.skip_cache_build else [("cache", str(cache))])
    for name, data in runs:
        site = out / f"site_{name}"
        shutil.rmtree(site, ignore_errors=True)
        cfg = DashboardConfig(sae=str(sae_dir), data=data, out=str(site), max_tokens=max_tokens)
        c0, t0 = time.process_time(), time.perf_counter()
        build_dashboard(cfg, progress=True)
        result[f"build_from_{name}_s"] = round(time.perf_counter() - t0, 1)
        result[f"build_from_{name}_cpu_s"] = round(time.process_time() - c0, 1)
        index = read_payload(site / "data" / "index.js")
        result["tokens"] = index["info"]["n_tokens"]
        result["dead_latents"] = sum(d == 0 for d in index["density"])
        result[f"site_{name}_mb"] = round(sum(f.stat().st_size for f in site.rglob("*") if f.is_file()
                                              and ".build" not in f.parts) / 2**20, 1)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.screenshots:
        result["screenshots"] = screenshots(out / "site_text", Path(args.screenshots))
    print(json.dumps(result, indent=2))


def screenshots(site: Path, folder: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    from saeforge.dashboard import read_payload, start_background

    index = read_payload(site / "data" / "index.js")
    # a representative page: a mid-frequency latent whose top examples all sit on one word-like token
    def clear(i: int) -> bool:
        toks = index["tokens"][i]
        return 0.001 < index["density"][i] < 0.05 and len(toks) == 1 and toks[0].strip().isalpha()

    pick = [i for i in range(len(index["id"])) if clear(i)] or list(range(len(index["id"])))
    lat = max(pick, key=lambda i: index["max"][i])
    folder.mkdir(parents=True, exist_ok=True)
    server, url = start_background(site)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_selector("#latent-table tbody tr")
            page.click("th[data-key=density]")
            page.screenshot(path=str(folder / "dashboard_index.png"))
            page.goto(url + f"#/latent/{lat}")
            page.wait_for_selector("#top-examples .example")
            page.hover("#top-examples .example:first-child .tok.centre")
            page.screenshot(path=str(folder / "dashboard_latent.png"))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return [str(folder / "dashboard_index.png"), str(folder / "dashboard_latent.png")]


if __name__ == "__main__":
    main()
