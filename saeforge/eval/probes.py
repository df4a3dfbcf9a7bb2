"""Probe loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", §4.3).

For each binary token-level task, fit a 1-D logistic probe ``p(y=1) = σ(w·h_j + b)`` on every latent's
pre-activation ``h_j`` and keep the best latent's cross-entropy; average over tasks. A low probe loss means some
single latent tracks the feature a human would name. The same probes on the raw model dimensions give a
baseline (a neuron basis), so the number says whether the SAE basis is *more* aligned with named features.

The probes are fitted with Newton's method, vectorised over latents: each latent is its own 2-parameter
(w, b) problem with a 2x2 Hessian, so one iteration over ``m`` latents costs a few passes over an
``[n, m]`` matrix. Details (all in :func:`fit_logistic_1d`):

* unregularised by default -- the maximum-likelihood probe that scikit-learn's ``LogisticRegression(C=inf)``
  finds; ``ridge > 0`` adds ``ridge/2 · w_s²`` on the weight of the *standardised* feature, an explicit option for
  (near-)separable data where the unregularised optimum is at infinity;
* features are standardised internally (the fitted (w, b) are mapped back to raw units) so one tolerance fits
  latents of any scale;
* every step is a damped Newton step with step halving until the loss does not increase, so separable
  latents (loss → 0 as ``|w| → ∞``) terminate at ``max_iter`` with a tiny loss instead of overflowing.

Task data, deterministic and documented: tokens come from whole documents (BOS excluded); documents whose
index is a multiple of ``heldout_every`` are held out; within each split the majority class is subsampled
(seeded) to the minority's size, capped at ``max_per_class``, so every task is balanced (an intercept-only
probe scores ln 2 ≈ 0.693). Tasks with fewer than ``min_positives`` training positives (or a quarter of that
held out) are skipped and reported.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.data.batches import documents
from saeforge.errors import SaeforgeError
from saeforge.eval.probe_tasks import BUILTIN_TASKS, read_jsonl_tasks, token_char_spans, token_labels
from saeforge.eval.shared import memo, sae_hook
from saeforge.hooks import capture, resolve_hook


# ---- the 1-D logistic probe --------------------------------------------------------------------------------------
@dataclass
class LogisticFit:
    w: Tensor  # [m] weight in raw feature units
    b: Tensor  # [m] intercept
    loss: Tensor  # [m] mean training cross-entropy (nats), without the ridge term
    n_iter: int
    converged: Tensor  # [m] bool: gradient below tol


def _objective(xs: Tensor, y: Tensor, w: Tensor, b: Tensor, ridge: float) -> Tensor:
    z = xs * w + b
    return (F.softplus(z) - y[:, None] * z).mean(0) + 0.5 * ridge * w * w


def fit_logistic_1d(
    x: Tensor, y: Tensor, max_iter: int = 50, tol: float = 1e-9, ridge: float = 0.0, dtype: torch.dtype = torch.float64
) -> LogisticFit:
    """Fit ``σ(w_j x[:, j] + b_j)`` to ``y`` for every column ``j`` of ``x [n, m]`` at once (Newton–Raphson).

    Minimises the mean binary cross-entropy (plus ``ridge/2 · w_s²`` on the standardised weight). Returns
    parameters in the units of ``x``. Constant columns get ``w = 0`` and the intercept-only fit.
    """
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise SaeforgeError(f"probe inputs must be x [n, m] and y [n]; got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.to(dtype), y.to(dtype)
    mu = x.mean(0)
    sd = x.std(0, unbiased=False)
    const = sd <= 1e-12 * (1 + mu.abs())
    sd = torch.where(const, torch.ones_like(sd), sd)
    xs = torch.where(const, torch.zeros_like(x), (x - mu) / sd)
    m = x.shape[1]
    p0 = y.mean().clamp(1e-12, 1 - 1e-12)
    w = torch.zeros(m, dtype=dtype, device=x.device)
    b = torch.full((m,), float(torch.log(p0 / (1 - p0))), dtype=dtype, device=x.device)
    loss = _objective(xs, y, w, b, ridge)
    active = (~const).nonzero().flatten()
    converged = const.clone()
    it = 0
    for it in range(1, max_iter + 1):
        if active.numel() == 0:
            break
        xa, wa, ba = xs[:, active], w[active], b[active]
        z = xa * wa + ba
        p = torch.sigmoid(z)
        r = p - y[:, None]
        s = p * (1 - p)
        g_w = (r * xa).mean(0) + ridge * wa
        g_b = r.mean(0)
        h_ww = (s * xa * xa).mean(0) + ridge + 1e-12  # the 1e-12 only keeps the solve finite when separable
        h_wb = (s * xa).mean(0)
        h_bb = s.mean(0) + 1e-12
        done = torch.maximum(g_w.abs(), g_b.abs()) < tol
        converged[active[done]] = True
        det = h_ww * h_bb - h_wb * h_wb
        dw = (h_bb * g_w - h_wb * g_b) / det
        db = (h_ww * g_b - h_wb * g_w) / det
        # Step halving: shrink each latent's step until its loss does not go up (vectorised backtracking).
        t = torch.ones_like(wa)
        old = loss[active]
        pending = ~done
        new_w, new_b = wa.clone(), ba.clone()
        for _ in range(40):
            if not pending.any():
                break
            idx = pending.nonzero().flatten()
            cw = wa[idx] - t[idx] * dw[idx]
            cb = ba[idx] - t[idx] * db[idx]
            cl = _objective(xa[:, idx], y, cw, cb, ridge)
            ok = cl <= old[idx] + 1e-15 * old[idx].abs().clamp_min(1)
            new_w[idx[ok]], new_b[idx[ok]] = cw[ok], cb[ok]
            old[idx[ok]] = cl[ok]
            pending[idx[ok]] = False
            t[idx[~ok]] *= 0.5
        stuck = pending  # no decreasing step along the Newton direction: numerically at the optimum
        w[active], b[active], loss[active] = new_w, new_b, old
        converged[active[stuck]] = True
        active = active[~(done | stuck)]
    raw_w = torch.where(const, torch.zeros_like(w), w / sd)
    raw_b = b - raw_w * mu
    return LogisticFit(raw_w, raw_b, _objective(xs, y, w, b, 0.0), it, converged)


def logistic_loss(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Mean cross-entropy of each column's probe on ``(x [n, m], y [n])`` -> ``[m]``."""
    x = x.to(w.dtype)
    z = x * w + b
    return (F.softplus(z) - y.to(w.dtype)[:, None] * z).mean(0)


def best_probe(
    x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, chunk: int = 2048, select_on: str = "train", **fit_kw: Any
) -> dict[str, Any]:
    """Fit every column's probe, pick the best column and report its held-out cross-entropy.

    ``select_on="train"`` (default) picks the column by training loss, so the held-out number is an honest
    estimate; ``"heldout"`` picks by held-out loss (optimistic; closer to "best loss across latents").
    """
    if select_on not in ("train", "heldout"):
        raise SaeforgeError(f"select_on={select_on!r}; use 'train' or 'heldout'")
    best = (math.inf, -1, math.inf, math.inf, 0.0, 0.0)  # (key, column, train, heldout, w, b)
    for s in range(0, x_tr.shape[1], chunk):
        fit = fit_logistic_1d(x_tr[:, s:s + chunk], y_tr, **fit_kw)
        te = logistic_loss(x_te[:, s:s + chunk], y_te, fit.w, fit.b)
        key = fit.loss if select_on == "train" else te
        j = int(torch.argmin(key))
        if float(key[j]) < best[0]:
            best = (float(key[j]), s + j, float(fit.loss[j]), float(te[j]), float(fit.w[j]), float(fit.b[j]))
    return {"index": best[1], "train_loss": best[2], "heldout_loss": best[3], "w": best[4], "b": best[5]}


# ---- task data -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_features(
    model, texts: list[str], hook: str, context_len: int, batch_size: int, require_prefix: bool = False
) -> dict[str, Any]:
    """Run ``texts`` (one document per row, truncated to ``context_len``) through the model up to ``hook``.

    Returns raw hook activations ``x [N, d]`` (float32, CPU), the document index of each row, and per document
    ``(doc index, decoded text, token spans, row slice)`` for labelling. BOS and other special tokens are
    dropped. With ``require_prefix`` (user spans refer to the original text) documents whose decoded tokens are
    not a prefix of the text are dropped and counted.
    """
    tok = model.tokenizer
    hp = resolve_hook(model, hook)
    special = set(getattr(tok, "special_ids", ()) or ())
    encoded, dropped = [], 0
    for d, text in enumerate(texts):
        ids = tok.encode(text, add_bos=True)[:context_len]
        dec, spans = token_char_spans(tok, ids)
        if require_prefix and not text.startswith(dec):
            dropped += 1
            continue
        keep = [i for i, t in enumerate(ids) if t not in special and spans[i][1] > spans[i][0]]
        if keep:
            encoded.append((d, ids, dec, spans, keep))
    xs, docs, meta, row = [], [], [], 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))  # similar lengths share a batch
    pad = tok.pad_id if tok.pad_id is not None else 0
    for s in range(0, len(order), batch_size):
        group = [encoded[i] for i in order[s:s + batch_size]]
        T = max(len(g[1]) for g in group)
        ids = torch.full((len(group), T), pad, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        for r, g in enumerate(group):
            ids[r, : len(g[1])] = torch.tensor(g[1])
            mask[r, : len(g[1])] = 1
        acts = capture(model, [hp], ids, attention_mask=mask)[hp.name].float()
        for r, (d, _ids, dec, spans, keep) in enumerate(group):
            xs.append(acts[r, keep].cpu())
            docs.append(torch.full((len(keep),), d, dtype=torch.long))
            meta.append((d, dec, [spans[i] for i in keep], slice(row, row + len(keep))))
            row += len(keep)
    if not xs:
        raise SaeforgeError("no text tokens to probe; pass data with non-empty documents")
    return {"x": torch.cat(xs), "doc": torch.cat(docs), "meta": meta, "n_dropped": dropped}


@torch.no_grad()
def sae_pre_acts(sae, x: Tensor, batch_rows: int = 4096) -> Tensor:
    """The SAE's pre-activations (after its input normalisation) of raw rows ``x`` -> float32 CPU ``[N, d_sae]``.
    Computed per task on the few thousand rows it uses, so memory never holds ``n_tokens × d_sae``."""
    dev = next(sae.parameters()).device
    out = [sae.pre_acts(sae.normalize_input(x[s:s + batch_rows].to(dev))[0]).float().cpu()
           for s in range(0, x.shape[0], batch_rows)]
    return torch.cat(out)


def _labels(meta, spans_of, n_rows: int) -> np.ndarray:
    y = np.zeros(n_rows, dtype=bool)
    for d, text, tspans, sl in meta:
        y[sl] = token_labels(tspans, spans_of(d, text), len(text))
    return y


def _balanced(idx: np.ndarray, y: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    pos, neg = idx[y[idx]], idx[~y[idx]]
    n = min(len(pos), len(neg), cap)
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def _probe_task(name, y, feats, doc, opts, shared_key: Any = None) -> dict[str, Any]:
    """One task's row. With ``shared_key`` (the features' identity) the SAE-independent ``baseline`` probe is
    remembered across SAEs inside ``saeforge.eval.shared.activation_memo``."""
    held = (doc.numpy() % opts["heldout_every"]) == 0
    tr_all, te_all = np.flatnonzero(~held), np.flatnonzero(held)
    n_pos_tr, n_pos_te = int(y[tr_all].sum()), int(y[te_all].sum())
    row: dict[str, Any] = {"task": name, "positives_train": n_pos_tr, "positives_heldout": n_pos_te,
                           "positive_rate": float(y.mean()) if len(y) else 0.0}
    need_te = max(5, opts["min_positives"] // 4)
    short = min(n_pos_tr, len(tr_all) - n_pos_tr) < opts["min_positives"] or \
        min(n_pos_te, len(te_all) - n_pos_te) < need_te
    if short:
        row["skipped"] = f"too few examples per class (need {opts['min_positives']} train / {need_te} held out)"
        return row
    rng = np.random.default_rng([opts["seed"], zlib.crc32(name.encode())])  # per task: stable subsamples
    tr = _balanced(tr_all, y, opts["max_per_class"], rng)
    te = _balanced(te_all, y, opts["max_per_class"], rng)
    ytr, yte = torch.from_numpy(y[tr]).double(), torch.from_numpy(y[te]).double()
    row.update(n_train=len(tr), n_heldout=len(te))
    p = float(ytr.mean())
    row["prior_loss"] = float(-(yte * math.log(p) + (1 - yte) * math.log(1 - p)).mean())
    for key, f in feats.items():
        def fit(f=f) -> dict[str, Any]:
            return best_probe(f(tr), ytr, f(te), yte, chunk=opts["chunk"], select_on=opts["select_on"],
                              max_iter=opts["max_iter"], ridge=opts["ridge"])

        row[key] = memo(("probe-fit", shared_key, name, tuple(sorted(opts.items()))), fit) \
            if key == "baseline" and shared_key is not None else fit()
    return row


def run_probe_suite(
    sae,
    model,
    data: str | Iterable[str],
    n_tokens: int = 20_000,
    tasks_jsonl: str | None = None,
    *,
    hook: str | None = None,
    builtin_tasks: bool = True,
    tasks: Sequence[str] | None = None,
    context_len: int = 128,
    batch_size: int = 16,
    min_positives: int = 20,
    max_per_class: int = 1000,
    heldout_every: int = 5,
    max_iter: int = 50,
    ridge: float = 0.0,
    select_on: str = "train",
    chunk: int = 2048,
    text_field: str = "text",
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe loss of ``sae`` on the built-in tasks over ``data`` (about ``n_tokens`` tokens) and on the tasks of
    ``tasks_jsonl``. Returns ``{"summary": {...}, "tasks": [per-task rows]}``; each row holds the best SAE latent
    (``"sae"``: index, train/held-out loss, w, b) and the best raw model dimension (``"baseline"``).

    ``tasks`` picks built-in tasks by name (None: all of ``BUILTIN_TASKS``; an empty list: none).

    Summary: ``probe_loss`` (mean held-out CE of the best latent over tasks), ``baseline_probe_loss`` (same on
    raw dimensions), ``prior_loss`` (intercept only; ln 2 for balanced tasks), task counts.
    """
    hook = sae_hook(sae, hook)
    if select_on not in ("train", "heldout"):
        raise SaeforgeError(f"select_on={select_on!r}; use 'train' or 'heldout'")
    chosen = list(BUILTIN_TASKS)
    if tasks is not None:
        by_name = {t.name: t for t in BUILTIN_TASKS}
        bad = [t for t in tasks if t not in by_name]
        if bad:
            raise SaeforgeError(f"unknown probe task(s) {bad}; choose among: {', '.join(by_name)}")
        chosen = [by_name[t] for t in tasks]
        builtin_tasks = builtin_tasks and bool(chosen)
    if not builtin_tasks and tasks_jsonl is None:
        raise SaeforgeError("no probe tasks: keep builtin_tasks=True or pass tasks_jsonl=FILE")
    if heldout_every < 2:
        raise SaeforgeError(f"heldout_every={heldout_every} must be >= 2 (every k-th document is held out)")
    opts = dict(heldout_every=heldout_every, min_positives=min_positives, max_per_class=max_per_class,
                chunk=chunk, select_on=select_on, max_iter=max_iter, ridge=ridge, seed=seed)
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, dict[str, Any], Any]] = []  # (source, features, [(task name, spans_of)])
    if builtin_tasks:
        def texts_of() -> list[str]:
            texts, got = [], 0
            for text in documents(data, text_field, split):
                texts.append(text)
                got += len(model.tokenizer.encode(text, add_bos=True)[:context_len]) - 1
                if got >= n_tokens:
                    break
            return texts

        data_key = str(data) if isinstance(data, (str, Path)) else id(data)
        f = memo(("probes", id(model), hook, data_key, n_tokens, context_len, batch_size, text_field, split),
                 lambda: collect_features(model, texts_of(), hook, context_len, batch_size))
        jobs.append(("builtin", f, [(t.name, (lambda d, s, t=t: t.spans(s))) for t in chosen]))
    if tasks_jsonl is not None:
        for name, examples in read_jsonl_tasks(tasks_jsonl).items():
            f = memo(("probes-file", id(model), hook, str(tasks_jsonl), name, context_len, batch_size),
                     lambda ex=examples: collect_features(model, [e.text for e in ex], hook, context_len,
                                                          batch_size, require_prefix=True))
            jobs.append(("jsonl", f, [(name, (lambda d, s, ex=examples: ex[d].spans))]))
    n_jobs = sum(len(j[2]) for j in jobs)
    bar = tqdm(total=n_jobs, desc="probe tasks", disable=not progress)
    for source, f, tasks in jobs:
        x = f["x"]
        feats = {"sae": lambda i, x=x: sae_pre_acts(sae, x[torch.from_numpy(i)]),
                 "baseline": lambda i, x=x: x[torch.from_numpy(i)]}
        for name, spans_of in tasks:  # labels and the baseline probe do not depend on the SAE: shared
            y = memo(("probe-labels", id(f), name), lambda: _labels(f["meta"], spans_of, x.shape[0]))
            row = _probe_task(name, y, feats, f["doc"], opts, shared_key=id(f))
            row["source"] = source
            if f["n_dropped"]:
                row["dropped_documents"] = f["n_dropped"]
            rows.append(row)
            bar.update(1)
    bar.close()
    used = [r for r in rows if "skipped" not in r]
    mean = lambda k: float(np.mean([r[k]["heldout_loss"] for r in used])) if used else None  # noqa: E731
    median = lambda k: float(np.median([r[k]["heldout_loss"] for r in used])) if used else None  # noqa: E731
    summary = {
        "probe_loss": mean("sae"),
        "baseline_probe_loss": mean("baseline"),
        "probe_loss_median": median("sae"),
        "baseline_probe_loss_median": median("baseline"),
        "prior_loss": float(np.mean([r["prior_loss"] for r in used])) if used else None,
        "n_tasks": len(used),
        "n_skipped": len(rows) - len(used),
        "n_tokens": int(sum(j[1]["x"].shape[0] for j in jobs)),
        "select_on": select_on,
        "ridge": ridge,
    }
    return {"summary": summary, "tasks": rows}

