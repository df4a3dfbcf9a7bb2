"""Write the static dashboard: ``index.html`` + ``app.js`` + ``style.css`` and the data they show.

Layout of ``OUT``::

    index.html, app.js, style.css      the single-page app (no CDN, no build step)
    data/index.js                      SAEFORGE.setIndex({...}): run info + one column per field, one entry per latent
    data/shards/00000.js ...           SAEFORGE.addShard({...}): ``shard_size`` latents' full records + their vocab
    .build/state.safetensors           the streaming pass's state (resume / rebuild the site without re-streaming)

Data files are JavaScript that hands a JSON object to a global (``SAEFORGE.addShard(<json>);``) instead of
``.json`` files: a page opened from ``file://`` cannot ``fetch`` JSON in Chromium, but it can load a
``<script src>``, so the same files work served and opened straight from disk. The payload is plain JSON on one
line between a fixed prefix and ``);`` -- :func:`read_payload` gets it back in Python.

A latent page loads only its own shard (16 latents by default), so a 65,536-latent dashboard is 4,096 small
files rather than one giant one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.io import write_text_atomic
from saeforge.dashboard.stream import linear_histogram, quantile_edges

STATIC = Path(__file__).resolve().parent / "static"
DENSE_THRESHOLD = 0.1  # the index's "dense" filter: firing on more than 10% of tokens
INDEX_PREFIX, SHARD_PREFIX, SUFFIX = "SAEFORGE.setIndex(", "SAEFORGE.addShard(", ");\n"


# ---------------------------------------------------------------------------------------------- explanations
def _explanation_table(obj: Any, p: Path, sae_name: str | None) -> dict:
    """Find N2G's ``explanations`` in what ``saeforge eval`` wrote: an N2G result itself, one SAE's
    ``eval.json`` (under ``extras.n2g``), or a sweep's combined ``eval.json`` (under ``saes.<name>``)."""
    if not isinstance(obj, dict):
        raise SaeforgeError(f"{p} is not a JSON object; pass the eval.json that `saeforge eval --all` wrote")
    if isinstance(obj.get("explanations"), dict):
        return obj["explanations"]
    n2g = obj.get("extras", {}).get("n2g") if isinstance(obj.get("extras"), dict) else None
    if isinstance(n2g, dict) and isinstance(n2g.get("explanations"), dict):
        return n2g["explanations"]
    if isinstance(n2g, dict) and n2g.get("error"):
        raise SaeforgeError(f"{p}: N2G failed in that evaluation ({n2g['error']}); rerun `saeforge eval --all`")
    saes = obj.get("saes")
    if isinstance(saes, dict) and saes:
        names = sorted(saes)
        if sae_name is None and len(names) == 1:
            sae_name = names[0]
        if sae_name not in saes:
            raise SaeforgeError(f"{p} holds the evaluations of {len(names)} SAEs ({', '.join(names[:6])}); pass that "
                                f"SAE's own file, {p.parent}/<name>/eval.json")
        return _explanation_table(saes[sae_name], p, None)
    raise SaeforgeError(f"{p} has no N2G explanations; run `saeforge eval --all` (it writes them under "
                        "extras.n2g) or pass a JSON with {\"explanations\": {id: {\"pattern\": ...}}}")


def load_explanations(path: str | Path, sae_name: str | None = None) -> dict[int, dict[str, Any]]:
    """Latent explanations from ``saeforge eval``'s output as written (one SAE's ``eval.json``, a sweep's
    combined ``eval.json`` with ``sae_name``, or a bare ``{"explanations": {latent_id: {"pattern", "precision",
    "recall", "f1"}}}``)."""
    p = Path(path)
    if not p.is_file():
        raise SaeforgeError(f"explanations file {p} not found; pass the eval.json or n2g JSON the evaluation wrote")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SaeforgeError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); pass the evaluation's JSON") from None
    table = _explanation_table(obj, p, sae_name)
    out: dict[int, dict[str, Any]] = {}
    for key, val in table.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise SaeforgeError(f"{p}: explanation key {key!r} is not a latent id; keys must be integers") from None
        if isinstance(val, str):
            val = {"pattern": val}
        if not isinstance(val, dict):
            raise SaeforgeError(f"{p}: explanation of latent {i} is a {type(val).__name__}; give an object with 'pattern'")
        out[i] = {k: val.get(k) for k in ("pattern", "precision", "recall", "f1") if val.get(k) is not None}
    return out


# ---------------------------------------------------------------------------------------------- helpers
def read_payload(path: str | Path) -> Any:
    """The JSON object inside a data ``.js`` file written by :func:`write_site`."""
    text = Path(path).read_text(encoding="utf-8")
    start, end = text.index("(") + 1, text.rindex(")")
    return json.loads(text[start:end])


def shard_path(out: str | Path, latent: int, shard_size: int) -> Path:
    return Path(out) / "data" / "shards" / f"{latent // shard_size:05d}.js"


def _js(prefix: str, obj: Any) -> str:
    # "</" cannot close the <script> element the file is loaded as, but escape it anyway for inlining.
    return prefix + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/") + SUFFIX


def _decimals(scale: float, digits: int = 4) -> int:
    """Decimals giving ``digits`` significant digits at magnitude ``scale`` (activations of one latent)."""
    if not math.isfinite(scale) or scale <= 0:
        return 6
    return int(min(8, max(0, digits - 1 - math.floor(math.log10(scale)))))


class _Examples:
    """Turns slot tensors into compact example lists ``[value, doc, pos, centre, tokens, acts]``."""

    def __init__(self, slots: dict[str, torch.Tensor], context: int):
        self.val = slots["val"].cpu().numpy()
        self.key = slots["key"].cpu().numpy()
        self.doc, self.pos = slots["doc"].cpu().numpy(), slots["pos"].cpu().numpy()
        self.tok, self.act = slots["tok"].cpu().numpy(), slots["act"].cpu().numpy()
        self.context = context

    def one(self, i: int, s: int, dec: int, used: set[int]) -> list[Any]:
        t = self.tok[i, s]
        ok = np.nonzero(t >= 0)[0]
        f, l = int(ok[0]), int(ok[-1]) + 1  # same-document rows are contiguous around the centre
        toks = t[f:l].tolist()
        used.update(toks)
        acts = np.round(self.act[i, s, f:l].astype(np.float64), dec).tolist()
        return [round(float(self.val[i, s]), dec), int(self.doc[i, s]), int(self.pos[i, s]), self.context - f,
                toks, acts]


# ---------------------------------------------------------------------------------------------- the writer
def latent_records(cfg: Any, stats: Any, effects: dict[str, torch.Tensor] | None,
                   neighbors: tuple[torch.Tensor, torch.Tensor] | None, explanations: dict[int, dict[str, Any]],
                   decoder_norms: dict[str, torch.Tensor] | None = None
                   ) -> tuple[list[dict[str, Any]], list[set[int]]]:
    """One JSON-ready record per latent, plus the token ids each record shows. ``decoder_norms`` (output hook ->
    [d_sae], for an SAE that writes several hooks) adds each latent's decoder norm at every hook."""
    m, n = stats.m, max(stats.n_rows, 1)
    top, res = stats.top.sorted(), stats.res.sorted()
    fires = stats.fires.cpu().numpy()
    act_sum = stats.act_sum.cpu().numpy()
    vmax = top["val"][:, 0].clamp_min(0).cpu()
    hist = stats.hist.cpu()
    lin = linear_histogram(hist, vmax, cfg.hist_bins).numpy()
    qe = quantile_edges(hist, vmax, cfg.n_bands)
    valid_res = res["key"].cpu() >= 0
    band = (res["val"].cpu().double()[:, :, None] >= qe[:, None, 1:-1]).sum(-1)
    band = torch.where(valid_res, band, -1).numpy()
    qe = qe.numpy()
    top_ok = (top["key"].cpu() > 0).numpy()
    tx, rx = _Examples(top, cfg.context), _Examples(res, cfg.context)
    vmax = vmax.numpy()
    eff = {k: v.cpu().numpy() for k, v in effects.items()} if effects is not None else None
    nb = (neighbors[0].cpu().numpy(), neighbors[1].cpu().numpy()) if neighbors is not None else None
    norms = {h: v.detach().float().cpu().numpy() for h, v in (decoder_norms or {}).items()}
    records, used_all = [], []
    for i in range(m):
        used: set[int] = set()
        dec = _decimals(float(vmax[i]))
        rec: dict[str, Any] = {
            "id": i, "fires": int(fires[i]), "density": float(fires[i]) / n, "max": round(float(vmax[i]), dec),
            "mean": float(act_sum[i]) / n, "mean_active": float(act_sum[i]) / max(int(fires[i]), 1),
        }
        rec["top"] = [tx.one(i, s, dec, used) for s in np.nonzero(top_ok[i])[0]]
        if fires[i] > 0:
            rec["hist"] = {"lo": 0.0, "hi": rec["max"], "counts": np.round(lin[i], 2).tolist()}
            bands = []
            for b in range(cfg.n_bands - 1, -1, -1):
                slots = np.nonzero(band[i] == b)[0][: cfg.per_band]  # random order: a uniform pick
                slots = slots[np.argsort(-rx.val[i, slots], kind="stable")]  # shown strongest first
                bands.append({"q": [b / cfg.n_bands, (b + 1) / cfg.n_bands],
                              "range": [round(float(qe[i, b]), dec), round(float(qe[i, b + 1]), dec)],
                              "examples": [rx.one(i, int(s), dec, used) for s in slots]})
            rec["bands"] = bands
        if eff is not None:
            pos = [[int(t), round(float(v), 4)] for t, v in zip(eff["top_ids"][i], eff["top_vals"][i])]
            neg = [[int(t), round(float(v), 4)] for t, v in zip(eff["bot_ids"][i], eff["bot_vals"][i])]
            used.update(t for t, _ in pos + neg)
            rec["logits"] = {"pos": pos, "neg": neg, "hist": {
                "lo": round(float(eff["hist_lo"][i]), 4), "hi": round(float(eff["hist_hi"][i]), 4),
                "counts": eff["hist"][i].tolist()}}
        if nb is not None:
            rec["neighbors"] = [[int(j), round(float(c), 4)] for j, c in zip(nb[0][i], nb[1][i])]
        if norms:
            rec["decoder_norms"] = {h: round(float(v[i]), 4) for h, v in norms.items()}
        rec["explanation"] = explanations.get(i)
        records.append(rec)
        used_all.append(used)
    return records, used_all


def _top_tokens(rec: dict[str, Any], strs: dict[int, str], n: int = 3) -> list[str]:
    """The distinct tokens at the centres of the strongest examples (what the index searches)."""
    out: list[str] = []
    for ex in rec["top"]:
        s = strs[ex[4][ex[3]]]
        if s not in out:
            out.append(s)
        if len(out) == n:
            break
    return out


def write_site(out: Path, cfg: Any, stats: Any, effects: dict[str, torch.Tensor] | None,
               neighbors: tuple[torch.Tensor, torch.Tensor] | None, explanations: dict[int, dict[str, Any]],
               tokenizer: Any, info: dict[str, Any], decoder_norms: dict[str, torch.Tensor] | None = None) -> Path:
    """Write every file of the site (see the module docstring) into ``out``."""
    out = Path(out)
    records, used = latent_records(cfg, stats, effects, neighbors, explanations, decoder_norms)
    all_ids = sorted(set().union(*used)) if used else []
    strs = {t: tokenizer.token_str(t) for t in all_ids}
    shard_dir = out / "data" / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    written = set()
    for s in range(0, len(records), cfg.shard_size):
        recs = records[s:s + cfg.shard_size]
        ids = sorted(set().union(*used[s:s + cfg.shard_size]))
        path = shard_path(out, s, cfg.shard_size)
        _write(path, _js(SHARD_PREFIX, {"first": s, "latents": recs,
                                                   "vocab": {str(t): strs[t] for t in ids}}))
        written.add(path.name)
    for stale in shard_dir.glob("*.js"):
        if stale.name not in written:
            stale.unlink()
    index = {
        "info": {**info, "shard_size": cfg.shard_size, "dense_threshold": DENSE_THRESHOLD,
                 "n_bands": cfg.n_bands, "context": cfg.context},
        "id": [r["id"] for r in records],
        "density": [r["density"] for r in records],
        "max": [r["max"] for r in records],
        "mean_active": [round(r["mean_active"], 6) for r in records],
        "tokens": [_top_tokens(r, strs) for r in records],
        "logits": [[strs[t] for t, _ in r["logits"]["pos"][:3]] if "logits" in r else [] for r in records],
        "expl": [(r["explanation"] or {}).get("pattern", "") for r in records],
        "f1": [(r["explanation"] or {}).get("f1") for r in records],
    }
    _write(out / "data" / "index.js", _js(INDEX_PREFIX, index))
    title = f"saeforge dashboard: {info.get('sae', '')}"
    html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{TITLE}}", _html_escape(title))
    _write(out / "index.html", html)
    for name in ("app.js", "style.css"):
        _write(out / name, (STATIC / name).read_text(encoding="utf-8"))
    return out


def _write(path: Path, text: str) -> None:
    """Atomic write, then world-readable (temp files are created 0600) so any web server can serve the site."""
    write_text_atomic(path, text)
    os.chmod(path, 0o644)


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
