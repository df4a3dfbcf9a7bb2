"""The dashboard in a real browser: Debian's Chromium driven by Playwright (installs nothing at run time).

Builds a dashboard for a random TopK SAE (width 128) on stories260K, serves it on 127.0.0.1 and checks, in
headless Chromium, that the index lists the latents, that search, sort and filters work, that a latent page
shows highlighted top examples whose values are the stored activations, that hovering shows the value and
that the same site works opened from file://. Screenshots go to tmp_path and, if SAEFORGE_SCREENSHOT_DIR is
set, there too. Skips (with the reason) only when Playwright or a Chromium binary is missing; CI installs
them with .ci/install_browser.sh.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOOK = "resid_post.2"


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed (it is in the test extras: pip install playwright)")
    exe = next((p for p in CHROMIUM if os.path.exists(p)), None) or shutil.which("chromium")
    if exe is None:
        pytest.skip("no Chromium binary at /usr/bin/chromium; install it with .ci/install_browser.sh (apt chromium)")
    return exe


def _screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    extra = os.environ.get("SAEFORGE_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(extra) / name)
    assert (tmp_path / name).stat().st_size > 10_000


@pytest.fixture(scope="module")
def site(tmp_path_factory, stories_model_path, tinystories_train):
    from saeforge.dashboard import DashboardConfig, build_dashboard
    from saeforge.sae import create_sae, make_config

    root = tmp_path_factory.mktemp("browser")
    text = root / "stories.txt"
    text.write_text("\n\n".join(tinystories_train.read_text().split("\n\n")[:40]))
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook=HOOK, model=str(stories_model_path)))
    sae.save(root / "sae")
    out = build_dashboard(DashboardConfig(sae=str(root / "sae"), data=str(text), out=str(root / "site")),
                          progress=False)
    return out


def test_dashboard_in_chromium(site, tmp_path):
    from playwright.sync_api import sync_playwright

    from saeforge.dashboard import read_payload, shard_path, start_background

    exe = _chromium()
    index = read_payload(site / "data" / "index.js")
    n = len(index["id"])
    server, url = start_background(site)
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # ---- the index lists the latents (100 a page)
            page.goto(url)
            page.wait_for_selector("#latent-table tbody tr")
            assert page.inner_text("#match-count").startswith(f"{n} of {n}")
            ids = [int(x) for x in page.locator("#latent-table tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.id)")]
            assert ids == list(range(100))
            page.click("#next-page")
            assert page.locator("#latent-table tbody tr").count() == n - 100
            page.click("#prev-page")

            # ---- sort by max activation (first click: descending), then ascending
            page.click("th[data-key=max]")
            shown = page.locator("#latent-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)")
            want = sorted(range(n), key=lambda i: (-index["max"][i], i))[:100]
            assert shown == want
            page.click("th[data-key=max]")
            shown = page.locator("#latent-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)")
            assert shown == sorted(range(n), key=lambda i: (index["max"][i], i))[:100]
            _screenshot(page, tmp_path, "dashboard_index.png")

            # ---- search by a token: exactly the latents showing it among top tokens / top logits
            def holders(token):
                return sorted(i for i in range(n) if any(token.lower() in t.lower()
                                                         for t in index["tokens"][i] + index["logits"][i]))

            token = next(t.strip() for ts in index["tokens"] for t in ts if t.strip() and len(holders(t.strip())) < n)
            page.click("th[data-key=id]")  # back to ascending ids
            page.fill("#search", token)
            assert page.inner_text("#match-count").startswith(f"{len(holders(token))} of")
            got = sorted(page.locator("#latent-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)"))
            assert got == holders(token)[:100] and 0 < len(got) < n
            page.fill("#search", "#12")
            assert page.locator("#latent-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)") == [12]
            page.fill("#search", "")

            # ---- filters: density range and dead/dense
            page.fill("#density-min", "5")
            assert page.inner_text("#match-count").startswith(f"{sum(d * 100 >= 5 for d in index['density'])} of")
            page.fill("#density-min", "")
            page.select_option("#filter-kind", "dense")
            dense = sum(d > index["info"]["dense_threshold"] for d in index["density"])
            assert page.inner_text("#match-count").startswith(f"{dense} of")
            page.select_option("#filter-kind", "dead")
            assert page.inner_text("#match-count").startswith(f"{sum(d == 0 for d in index['density'])} of")
            page.select_option("#filter-kind", "all")

            # ---- a latent page: highlighted top examples whose values are the stored activations
            lat = max(range(n), key=lambda i: index["max"][i])
            page.fill("#search", f"#{lat}")
            page.click(f"#latent-table tbody tr[data-id='{lat}'] a")
            page.wait_for_selector("#top-examples .example")
            shard = read_payload(shard_path(site, lat, index["info"]["shard_size"]))
            rec = shard["latents"][lat - shard["first"]]
            examples = page.locator("#top-examples .example").evaluate_all("""exs => exs.map(e => ({
                value: +e.dataset.value,
                acts: [...e.querySelectorAll('.tok')].map(t => +t.dataset.act),
                text: [...e.querySelectorAll('.tok')].map(t => t.dataset.token),
                centre: [...e.querySelectorAll('.tok')].findIndex(t => t.classList.contains('centre')),
                lit: [...e.querySelectorAll('.tok')].map(t => getComputedStyle(t).backgroundColor)}))""")
            assert len(examples) == len(rec["top"]) > 0
            vocab = shard["vocab"]
            for ex, (val, _doc, _pos, centre, toks, acts) in zip(examples, rec["top"]):
                assert ex["value"] == val and ex["acts"] == acts and ex["centre"] == centre
                assert ex["text"] == [vocab[str(t)] for t in toks]
                assert acts[centre] == val
                for a, colour in zip(acts, ex["lit"]):  # every firing token is highlighted, the others not
                    assert (colour != "rgba(0, 0, 0, 0)") == (a > 0), (a, colour)
            values = [ex["value"] for ex in examples]
            assert values == sorted(values, reverse=True)
            page.hover("#top-examples .example:first-child .tok.centre")
            tip = page.locator("#tooltip")
            assert tip.is_visible() and "activation" in tip.inner_text()
            assert f"{rec['top'][0][0]:.4g}" in tip.inner_text().replace("e+0", "e+")
            assert page.locator(".band").count() >= 1 and page.locator("svg.hist").count() == 2
            _screenshot(page, tmp_path, "dashboard_latent.png")

            # ---- the same files opened from disk (file://): data arrives through <script> tags
            page.goto((site / "index.html").as_uri() + f"#/latent/{lat}")
            page.wait_for_selector("#top-examples .example")
            assert page.locator("#top-examples .example").count() == len(rec["top"])
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not errors, errors
