"""Turning evaluation results into a text table, a Markdown report and PNG plots.

A report is a list of :class:`Section` objects -- a title, optional prose, optional table rows and optional
figure paths -- so any evaluation module can contribute one without this file knowing about it. A module's
result dict becomes sections through :func:`sections_from_result`: if the dict carries a ``"report"`` key
(``{"title", "text", "rows": [dict, ...], "columns", "figures": [path, ...]}``) that is used as is; otherwise
its scalar entries (nested dicts flattened with dots) become a two-column metric/value table.

Plots use matplotlib's object API (``Figure`` + Agg), never ``pyplot``, so no global backend state is touched
and nothing needs a display.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from saeforge.io import write_bytes_atomic, write_text_atomic

# (column name, path in a result dict)
SUMMARY_COLUMNS: list[tuple[str, str]] = [
    ("l0", "reconstruction.l0"),
    ("fvu", "reconstruction.fvu"),
    ("mse", "reconstruction.mse"),
    ("cos", "reconstruction.cos_sim"),
    ("rel_norm", "reconstruction.rel_norm"),
    ("dead", "features.dead"),
    ("dense", "features.dense"),
    ("ce_clean", "downstream.ce_clean"),
    ("ce_sae", "downstream.ce_spliced"),
    ("ce_zero", "downstream.ce_zero"),
    ("d_ce", "downstream.delta_ce"),
    ("kl", "downstream.kl"),
    ("ce_rec", "downstream.ce_recovered"),
    ("ce_rec_mean", "downstream.ce_recovered_mean"),
]


@dataclass
class Section:
    title: str
    text: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] | None = None
    figures: list[str] = field(default_factory=list)  # paths; made relative to the report folder


def fmt(v: Any) -> str:
    """Compact, aligned-friendly rendering of one table cell."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def get_path(d: Mapping[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


# the headline number of each optional (--all) section, shown in the report's summary table
EXTRA_SUMMARY_COLUMNS: list[tuple[str, str]] = [
    ("kl_rec", "downstream.kl_recovered"),
    ("probe_loss", "extras.probes.summary.probe_loss"),
    ("n2g_prec", "extras.n2g.summary.precision"),
    ("n2g_rec", "extras.n2g.summary.recall"),
    ("abl_sparsity", "extras.ablation.summary.ablation_sparsity"),
]
LONG_TABLE_ROWS = 20  # a per-item table longer than this goes to latents.csv instead of the report


def summary_row(name: str, result: Mapping[str, Any], extra: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"sae": name}
    for col, path in SUMMARY_COLUMNS + (EXTRA_SUMMARY_COLUMNS if extra else []):
        row[col] = get_path(result, path)
    return row


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns:
        return list(columns)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return [c for c in cols if any(r.get(c) is not None for r in rows)]


def text_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as an aligned plain-text table (first column left-aligned, the rest right-aligned)."""
    cols = _columns(rows, columns)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(cols)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    cols = _columns(rows, columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(out)


def format_table(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """The summary table of one result (``evaluate``'s dict), a list of them, or ``{name: result}``."""
    if isinstance(results, Mapping) and isinstance(results.get("saes"), Mapping):
        results = results["saes"]
    if isinstance(results, Mapping) and "reconstruction" in results:
        items = [(get_path(results, "sae.name") or "sae", results)]
    elif isinstance(results, Mapping):
        items = list(results.items())
    else:
        items = [(get_path(r, "sae.name") or f"sae{i}", r) for i, r in enumerate(results)]
    return text_table([summary_row(n, r) for n, r in items])


def flatten(d: Mapping[str, Any], prefix: str = "", max_list: int = 8) -> dict[str, Any]:
    """Scalar leaves of a nested dict as ``{"a.b": value}``; short scalar lists are joined, long ones skipped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + ".", max_list))
        elif isinstance(v, (list, tuple)):
            if len(v) <= max_list and all(isinstance(x, (int, float, str, bool)) or x is None for x in v):
                out[key] = ", ".join(fmt(x) for x in v)
        elif isinstance(v, (int, float, str, bool, np.number)) or v is None:
            out[key] = v
    return out


def _table_rows(items: Sequence[Any], max_rows: int = 200) -> list[dict[str, Any]]:
    return [flatten(x) for x in items[:max_rows] if isinstance(x, Mapping)]


def sections_from_result(title: str, result: Mapping[str, Any],
                         long_rows: list[dict[str, Any]] | None = None) -> list[Section]:
    """Sections for any JSON-able result dict (see the module docstring for the ``"report"`` contract).

    Without a ``"report"`` key: one metric/value table of the scalar leaves, plus one table per list of
    dicts (e.g. per-task rows), plus the paths under ``"figures"``. With ``long_rows`` given, lists longer
    than ``LONG_TABLE_ROWS`` (per-latent data) are appended to it instead, for ``latents.csv``.
    """
    if not isinstance(result, Mapping):
        return [Section(title=title, text=fmt(result))]
    rep = result.get("report")
    if isinstance(rep, Mapping):
        return [Section(
            title=str(rep.get("title", title)), text=str(rep.get("text", "")), rows=list(rep.get("rows", [])),
            columns=rep.get("columns"), figures=[str(f) for f in rep.get("figures", [])],
        )]
    if "error" in result and len(result) <= 2:
        return [Section(title=title, text=f"Failed: {result['error']}")]
    flat = flatten({k: v for k, v in result.items() if k != "figures"})
    figs = [str(f) for f in result.get("figures", [])]
    out = [Section(title=title, rows=[{"metric": k, "value": v} for k, v in flat.items()], figures=figs)]
    for k, v in result.items():
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            if len(v) > LONG_TABLE_ROWS and long_rows is not None:  # per-latent data: to the CSV, linked
                long_rows += [{"section": f"{title}: {k}", **flatten(x)} for x in v if isinstance(x, Mapping)]
                out.append(Section(title=f"{title}: {k}",
                                   text=f"{len(v)} rows in [latents.csv](latents.csv) (section `{title}: {k}`)."))
            else:
                out.append(Section(title=f"{title}: {k}", rows=_table_rows(v)))
    return out


def render_markdown(title: str, sections: Iterable[Section], base: Path) -> str:
    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        if s.text:
            parts += [s.text, ""]
        if s.rows:
            parts += [markdown_table(s.rows, s.columns), ""]
        for f in s.figures:
            p = Path(f).resolve()
            root = Path(base).resolve()
            rel = p.relative_to(root) if p.is_relative_to(root) else p  # links work from the report's folder
            parts += [f"![{p.stem}]({rel.as_posix()})", ""]
    return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: Iterable[Section]) -> Path:
    path = Path(path)
    write_text_atomic(path, render_markdown(title, sections, path.parent.resolve()))
    return path


# ---- plots ------------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (axes if ncols > 1 else [axes])


def _save(fig: Any, path: str | Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())
    return str(path)


def plot_density(densities: Mapping[str, np.ndarray], path: str | Path) -> str:
    """Histogram of log10 firing density per SAE (dead latents are counted in the legend)."""
    fig, (ax,) = _figure()
    for name, d in densities.items():
        fired = d[d > 0]
        if fired.size:
            ax.hist(np.log10(fired), bins=50, histtype="step", linewidth=1.5,
                    label=f"{name} ({int((d == 0).sum())} dead)")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    ax.set_title("Latent firing density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_token_losses(per_token: Mapping[str, Mapping[str, np.ndarray]], path: str | Path) -> str:
    """Per-token CE (clean vs spliced) and per-token KL(clean ‖ spliced) histograms."""
    fig, (ax1, ax2) = _figure(ncols=2, width=5.5)
    first = next(iter(per_token.values()))
    hi = max(float(np.percentile(t["ce_zero"], 99.5)) for t in per_token.values()) if first["ce_zero"].size else 1.0
    bins = np.linspace(0, max(hi, 1e-3), 60)
    ax1.hist(first["ce_clean"], bins=bins, histtype="step", color="k", linewidth=1.5, label="clean")
    for name, t in per_token.items():
        ax1.hist(t["ce_spliced"], bins=bins, histtype="step", linewidth=1.2, label=f"{name}")
    ax1.set_xlabel("per-token cross-entropy (nats)")
    ax1.set_ylabel("tokens")
    ax1.set_title("CE: clean vs SAE spliced")
    ax1.legend(fontsize=8)
    for name, t in per_token.items():
        kl = np.clip(t["kl"], 1e-8, None)
        ax2.hist(np.log10(kl), bins=60, histtype="step", linewidth=1.2, label=name)
    ax2.set_xlabel("log10 KL(clean ‖ spliced) per token (nats; floored at 1e-8)")
    ax2.set_ylabel("tokens")
    ax2.set_title("Per-token KL")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_ce_recovered(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> str:
    """Bar chart of CE loss recovered against zero- and mean-ablation, one pair of bars per SAE."""
    names = list(results)
    zero = [get_path(r, "downstream.ce_recovered") for r in results.values()]
    mean = [get_path(r, "downstream.ce_recovered_mean") for r in results.values()]
    fig, (ax,) = _figure(width=max(4.0, 1.2 * len(names) + 2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [np.nan if v is None else v for v in zero], 0.4, label="vs zero ablation")
    ax.bar(x + 0.2, [np.nan if v is None else v for v in mean], 0.4, label="vs mean ablation")
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set_ylabel("CE loss recovered")
    ax.set_title("CE loss recovered (1 = lossless)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_frontier(points: Sequence[Mapping[str, Any]], path: str | Path) -> str:
    """L0 against FVU (and against ΔCE when measured) across SAEs, grouped by architecture."""
    has_ce = any(p.get("delta_ce") is not None for p in points)
    fig, axes = _figure(ncols=2 if has_ce else 1, width=5.5)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(str(p.get("arch", "sae")), []).append(p)
    for ax, key, label in zip(axes, ("fvu", "delta_ce"), ("FVU", "ΔCE (nats)")):
        for arch, ps in groups.items():
            ps = sorted((p for p in ps if p.get(key) is not None and p.get("l0") is not None), key=lambda p: p["l0"])
            if not ps:
                continue
            ax.plot([p["l0"] for p in ps], [p[key] for p in ps], marker="o", label=arch)
            for p in ps:
                ax.annotate(str(p.get("name", "")), (p["l0"], p[key]), fontsize=7, alpha=0.7)
        ax.set_xscale("log")
        if key == "fvu":
            ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.set_title(f"Sparsity–{label.split()[0]} frontier")
        ax.legend(fontsize=8)
    return _save(fig, path)


# ---- the whole report -------------------------------------------------------------------------------------
def frontier_points(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per SAE for frontier plots and scaling fits."""
    pts = []
    for name, r in results.items():
        pts.append({
            "name": name, "arch": get_path(r, "sae.arch"), "d_sae": get_path(r, "sae.d_sae"),
            "k": get_path(r, "sae.k"), "l0": get_path(r, "reconstruction.l0"), "fvu": get_path(r, "reconstruction.fvu"),
            "mse": get_path(r, "reconstruction.mse"), "delta_ce": get_path(r, "downstream.delta_ce"),
            "ce_recovered": get_path(r, "downstream.ce_recovered"), "kl": get_path(r, "downstream.kl"),
            "dead_frac": get_path(r, "features.dead_frac"),
        })
    return pts


def build_report(
    out: str | Path,
    results: Mapping[str, Mapping[str, Any]],
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    per_token: Mapping[str, Mapping[str, np.ndarray]],
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    global_extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out/report.md`` and its PNGs under ``out/figures``; every section is optional."""
    out = Path(out)
    figs = out / "figures"
    first = next(iter(results.values()))
    cfg = first.get("config", {})
    intro = (f"Model `{first.get('model')}`, data `{first.get('data')}`, "
             f"{get_path(first, 'reconstruction.n_tokens')} eval tokens (context {cfg.get('context_len')}). "
             "Definitions of every metric: docs/eval.md.")
    merged = {n: {**r, "extras": (extras or {}).get(n, r.get("extras", {}))} for n, r in results.items()}
    summary = Section("Summary", text=intro, rows=[summary_row(n, r, extra=True) for n, r in merged.items()])
    sections = [summary]
    sections.append(Section("Reconstruction", rows=[{"sae": n, **r["reconstruction"]} for n, r in results.items()]))
    lat_rows = []
    for n, r in results.items():
        f = r["features"]
        lat_rows.append({"sae": n, "d_sae": f["d_sae"], "dead": f["dead"], "dead_frac": f["dead_frac"],
                         "dense": f["dense"], "dense_frac": f["dense_frac"],
                         "density_median": get_path(f, "density.q50"),
                         "act_max_median": get_path(f, "activation.max.q50"),
                         "dec_cos_mean": get_path(f, "decoder_cos.mean"),
                         "dec_cos_q99": get_path(f, "decoder_cos.q99")})
    dens = {n: np.asarray(a["density"]) for n, a in arrays.items() if "density" in a}
    lat_figs = [plot_density(dens, figs / "density.png")] if dens else []
    sections.append(Section("Latents", text=f"Dense = firing on more than {cfg.get('dense_threshold')} of tokens; "
                            "dec_cos = max |cos| between a decoder row and any other.", rows=lat_rows, figures=lat_figs))
    ran = {n: r for n, r in results.items() if "skipped" not in r.get("downstream", {})}
    if ran:
        d_figs = [plot_ce_recovered(ran, figs / "ce_recovered.png")]
        pt = {n: per_token[n] for n in ran if n in per_token}
        if pt:
            d_figs.append(plot_token_losses(pt, figs / "token_losses.png"))
        sections.append(Section("Downstream loss", rows=[{"sae": n, **r["downstream"]} for n, r in ran.items()],
                                figures=d_figs))
    else:
        why = get_path(first, "downstream.skipped")
        sections.append(Section("Downstream loss", text=f"Skipped: {why}."))
    if len(results) >= 2:
        pts = frontier_points(results)
        summary.figures.append(plot_frontier(pts, figs / "frontier.png"))
        sections.append(Section("Sparsity frontier", rows=pts))
    if ran:  # the plots a person looks at first sit under the summary table
        summary.figures.append(d_figs[0])
    long_rows: list[dict[str, Any]] = []
    for name, by_key in (extras or {}).items():
        for key, res in by_key.items():
            sections += sections_from_result(f"{key} ({name})", res, long_rows)
    for key, res in (global_extras or {}).items():
        if res is not None:
            sections += sections_from_result(key, res, long_rows)
    if long_rows:
        write_csv_atomic(out / "latents.csv", long_rows)
        summary.text += " Per-latent data: [latents.csv](latents.csv)."
    return write_report(out / "report.md", "saeforge evaluation", sections)


def write_csv_atomic(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows (dicts, columns the union of their keys in first-seen order) as a CSV file, written atomically."""
    import csv

    cols = _columns(rows, None)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return path
