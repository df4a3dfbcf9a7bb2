"""Explainability by Neuron to Graph (N2G; Foote et al. 2023), as used by Gao et al. 2024 §4.4.

A latent's explanation is a set of token patterns that end at the token where it fires. Each pattern comes from
one activating context (the latent's top activations plus some random activating ones):

1. **Truncate**: the shortest suffix of the context, ending at the activating token, whose activation (run
   alone after a BOS token) is at least ``keep_frac`` (½) of the original activation;
2. **Wildcards**: each earlier token of that suffix is replaced by the pad token in turn; if that costs less
   than ``keep_frac`` of the suffix's activation the token becomes a wildcard ``*`` (any one token). Leading
   wildcards are dropped (they only require the context to be long enough);
3. **Trie**: the patterns are stored reversed (activating token first) in a trie. On new text the trie
   predicts, at each position, the largest activation among the patterns that match there (0 if none).

The explanation is scored on held-out text as a classifier of "the latent fires" (activation >
``fire_threshold``): precision, recall and F1. Gao et al. report precision and recall. Of the original N2G we
keep truncation and pad-token wildcards only (no saliency weighting, no data augmentation); see docs/metrics.md. The patterns are also rendered as strings for the dashboard.

Re-running the model on truncated or edited contexts is the expensive part: all such sequences are grouped by
length (so no padding is needed) and run in batches that stop at the SAE's hook (``capture(stop_early=True)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.data.batches import first_contexts
from saeforge.errors import SaeforgeError
from saeforge.eval.shared import memo, sae_hook
from saeforge.hooks import capture, resolve_hook

WILD = -1  # a wildcard position in a pattern


# ---- the pattern trie -------------------------------------------------------------------------------------------
@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    value: float | None = None  # activation predicted when a pattern ends here
    count: int = 0


class PatternTrie:
    """Token patterns (tuples of ids, ``WILD`` = any token) ending at the activating token.

    ``predict(tokens)`` gives, at every position, the largest value among patterns whose last token is at that
    position and whose earlier tokens match the tokens before it (a wildcard matches any one token).
    """

    def __init__(self) -> None:
        self.root = _Node()
        self.patterns: dict[tuple[int, ...], list[float]] = {}

    def add(self, pattern: Sequence[int], value: float) -> None:
        pattern = tuple(int(t) for t in pattern)
        if not pattern or pattern[-1] == WILD:
            raise SaeforgeError("an N2G pattern must end with a real token (the activating one)")
        node = self.root
        for t in reversed(pattern):
            node = node.children.setdefault(t, _Node())
        node.count += 1
        node.value = value if node.value is None else max(node.value, value)
        self.patterns.setdefault(pattern, []).append(float(value))

    def __len__(self) -> int:
        return len(self.patterns)

    def match(self, tokens: Sequence[int], t: int) -> float | None:
        """Largest value of the patterns that end at position ``t`` of ``tokens``, or None."""
        best: float | None = None
        stack = [(self.root.children.get(int(tokens[t])), t - 1)]
        while stack:
            node, i = stack.pop()
            if node is None:
                continue
            if node.value is not None and (best is None or node.value > best):
                best = node.value
            if i < 0 or not node.children:
                continue
            stack.append((node.children.get(int(tokens[i])), i - 1))
            if WILD in node.children:
                stack.append((node.children[WILD], i - 1))
        return best

    def predict(self, tokens: Sequence[int]) -> np.ndarray:
        """Predicted activation at every position of one token sequence (0 where no pattern matches)."""
        toks = [int(t) for t in tokens]
        out = np.zeros(len(toks), dtype=np.float64)
        first = self.root.children
        for t, tok in enumerate(toks):
            if tok in first:
                v = self.match(toks, t)
                if v is not None:
                    out[t] = v
        return out

    def render(self, token_str: Callable[[int], str], max_patterns: int = 5) -> str:
        """Readable explanation: the most frequent patterns joined by `` | ``; each token in brackets (its
        leading space kept) and ``*`` for a wildcard, e.g. ``[ the] * [ cat] | [ dog]``."""
        ranked = sorted(self.patterns.items(), key=lambda kv: (-len(kv[1]), -max(kv[1])))
        return " | ".join(
            " ".join("*" if t == WILD else f"[{token_str(t)}]" for t in p) for p, _ in ranked[:max_patterns]
        )


# ---- precision / recall -------------------------------------------------------------------------------------------
def precision_recall(pred: np.ndarray, true: np.ndarray) -> dict[str, float | None]:
    """Precision, recall and F1 of boolean predictions; None where the ratio is 0/0."""
    tp = int(np.sum(pred & true))
    n_pred, n_true = int(pred.sum()), int(true.sum())
    p = tp / n_pred if n_pred else None
    r = tp / n_true if n_true else None
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else None  # = 2PR / (P + R)
    return {"precision": p, "recall": r, "f1": f1, "n_true": n_true, "n_pred": n_pred}


# ---- running sequences in batches ---------------------------------------------------------------------------------
ActFn = Callable[[Tensor], Tensor]  # tokens [B, T] -> activations of the chosen latents [B, T, L]


def _last_acts(act_fn: ActFn, seqs: list[list[int]], cols: list[int], batch_size: int) -> np.ndarray:
    """Activation of latent column ``cols[i]`` at the last position of ``seqs[i]``; equal lengths batch together."""
    out = np.zeros(len(seqs), dtype=np.float64)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    for n, idx in by_len.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            toks = torch.tensor([seqs[i] for i in chunk], dtype=torch.long)
            acts = act_fn(toks)[:, n - 1, :]  # [b, L]
            c = torch.tensor([cols[i] for i in chunk], dtype=torch.long, device=acts.device)
            out[chunk] = acts.gather(1, c[:, None]).squeeze(1).double().cpu().numpy()
    return out


def _all_acts(act_fn: ActFn, tokens: Tensor, batch_size: int) -> Tensor:
    return torch.cat([act_fn(tokens[s:s + batch_size]).float().cpu() for s in range(0, len(tokens), batch_size)])


# ---- the N2G procedure --------------------------------------------------------------------------------------------
def build_patterns(
    act_fn: ActFn,
    tokens: Tensor,
    acts: Tensor,
    keep: Tensor,
    *,
    bos_id: int | None,
    pad_id: int,
    n_top: int = 8,
    n_random: int = 4,
    max_suffix: int = 16,
    keep_frac: float = 0.5,
    fire_threshold: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[PatternTrie]:
    """One :class:`PatternTrie` per latent column of ``acts [C, T, L]`` (activations on ``tokens [C, T]``)."""
    C, T, L = acts.shape
    g = torch.Generator().manual_seed(seed)
    masked = acts.masked_fill(~keep[:, :, None], -math.inf)
    examples: list[tuple[int, int, int, float]] = []  # (column, context, position, activation)
    for col in range(L):
        a = masked[:, :, col].flatten()
        firing = (a > fire_threshold).nonzero().flatten()
        if firing.numel() == 0:
            continue
        top = firing[a[firing].argsort(descending=True)[:n_top]]
        rest = firing[~torch.isin(firing, top)]
        rnd = rest[torch.randperm(rest.numel(), generator=g)[:n_random]]
        for flat in torch.cat([top, rnd]).tolist():
            examples.append((col, flat // T, flat % T, float(a[flat])))
    prefix = [] if bos_id is None else [int(bos_id)]
    # 1. the shortest suffix that keeps keep_frac of the activation: suffix lengths n = 1, 2, ... in rounds, each
    # round running only the examples no shorter suffix satisfied (the same answer as trying every n at once)
    suffix: dict[int, tuple[list[int], float]] = {}
    longest = {e: min(max_suffix, t - (1 if bos_id is not None and int(tokens[c, 0]) == bos_id else 0) + 1)
               for e, (col, c, t, _) in enumerate(examples)}
    for n in range(1, max(longest.values(), default=0) + 1):
        todo = [e for e in range(len(examples)) if e not in suffix and n <= longest[e]]
        if not todo:
            break
        seqs = [prefix + tokens[examples[e][1], examples[e][2] - n + 1:examples[e][2] + 1].tolist() for e in todo]
        got = _last_acts(act_fn, seqs, [examples[e][0] for e in todo], batch_size)
        for e, v, s in zip(todo, got, seqs):
            if v >= keep_frac * examples[e][3]:
                suffix[e] = (s[len(prefix):], float(v))
    suffix = dict(sorted(suffix.items()))  # example order, as the tries are built
    # 2. pad-token replacement decides the wildcards
    seqs, cols, owner = [], [], []
    for e, (toks, _) in suffix.items():
        for i in range(len(toks) - 1):
            edited = list(toks)
            edited[i] = pad_id
            seqs.append(prefix + edited)
            cols.append(examples[e][0])
            owner.append((e, i))
    got = _last_acts(act_fn, seqs, cols, batch_size) if seqs else np.zeros(0)
    wild: dict[int, set[int]] = {e: set() for e in suffix}
    for (e, i), v in zip(owner, got):
        a_s = suffix[e][1]
        if a_s - v < keep_frac * a_s:
            wild[e].add(i)
    # 3. the tries
    tries = [PatternTrie() for _ in range(L)]
    for e, (toks, _) in suffix.items():
        pat = [WILD if i in wild[e] else t for i, t in enumerate(toks)]
        while pat and pat[0] == WILD:
            pat.pop(0)
        tries[examples[e][0]].add(pat, examples[e][3])
    return tries


def score_patterns(
    tries: list[PatternTrie], tokens: Tensor, acts: Tensor, keep: Tensor, fire_threshold: float = 0.0
) -> list[dict[str, float | None]]:
    """Precision / recall / F1 of each trie's "fires" prediction against ``acts [C, T, L]`` on ``tokens``."""
    k = keep.numpy().astype(bool)
    out = []
    for col, trie in enumerate(tries):
        pred = np.stack([trie.predict(row) for row in tokens.tolist()]) > 0
        true = acts[:, :, col].numpy() > fire_threshold
        out.append(precision_recall(pred[k], true[k]))
    return out


def _contexts(model, data: str | Iterable[str], context_len: int, n: int, text_field: str = "text",
              split: str = "train") -> tuple[Tensor, Tensor]:
    batch = first_contexts(model.tokenizer, data, n, context_len=context_len, text_field=text_field, split=split)
    return batch.tokens, batch.keep


@torch.no_grad()
def _hook_acts(model, hook: str, tokens: Tensor, batch_size: int) -> Tensor:
    """Activations at ``hook`` of every context ``[C, T, d]`` (float32, CPU; the forward stops at the hook)."""
    hp = resolve_hook(model, hook)
    return torch.cat([capture(model, [hp], tokens[s:s + batch_size], stop_early=True)[hp.name].float().cpu()
                      for s in range(0, len(tokens), batch_size)])


def sae_act_fn(sae, model, hook: str, latents: Sequence[int] | None = None) -> ActFn:
    """tokens -> the SAE's latent activations ``[B, T, L]`` at ``hook`` (forward stops at the hook)."""
    hp = resolve_hook(model, hook)
    dev = next(sae.parameters()).device
    idx = None if latents is None else torch.as_tensor(list(latents), dtype=torch.long, device=dev)

    @torch.no_grad()
    def fn(tokens: Tensor) -> Tensor:
        x = capture(model, [hp], tokens, stop_early=True)[hp.name].to(dev).float()
        f = sae.encode(x)
        return f if idx is None else f.index_select(-1, idx)

    return fn


def run_n2g(
    sae,
    model,
    data: str | Iterable[str],
    n_latents: int = 64,
    *,
    hook: str | None = None,
    latents: Sequence[int] | None = None,
    n_train_contexts: int = 256,
    n_heldout_contexts: int = 128,
    context_len: int = 64,
    n_top: int = 8,
    n_random: int = 4,
    max_suffix: int = 16,
    keep_frac: float = 0.5,
    fire_threshold: float = 0.0,
    min_fires: int = 5,
    batch_size: int = 64,
    rerun_batch: int | None = None,
    text_field: str = "text",
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """N2G explanations of ``n_latents`` latents (a seeded sample of those firing >= ``min_fires`` times on the
    training contexts; or exactly ``latents``) scored on held-out contexts that follow them in ``data``.

    ``batch_size`` contexts go through the model per pass; the short truncated/edited sequences (at most
    ``max_suffix + 1`` tokens) go ``rerun_batch`` at a time (default ``max(64, batch_size)``).

    Returns ``{"summary": {precision, recall, f1 (means over latents), ...}, "latents": {...},
    "explanations": {latent: {"pattern", "precision", "recall", "f1"}}}``.
    """
    hook = sae_hook(sae, hook)
    tok = model.tokenizer
    n_ctx = n_train_contexts + n_heldout_contexts
    data_key = data if isinstance(data, str) else id(data)
    key = (id(model), hook, data_key, context_len, n_ctx, text_field, split, batch_size)
    # the contexts and their activations at the hook do not depend on the SAE: with several SAEs in one
    # ``saeforge eval --all`` they are computed once (saeforge.eval.shared) and only the encoder runs per SAE
    tokens, keep = memo(("n2g-contexts",) + key,
                        lambda: _contexts(model, data, context_len, n_ctx, text_field, split))
    X = memo(("n2g-hook-acts",) + key, lambda: _hook_acts(model, hook, tokens, batch_size))
    tr_tok, tr_keep = tokens[:n_train_contexts], keep[:n_train_contexts]
    te_tok, te_keep = tokens[n_train_contexts:], keep[n_train_contexts:]
    dev = next(sae.parameters()).device

    @torch.no_grad()
    def encoded(rows: slice, idx: Tensor | None = None) -> Tensor:
        f = sae.encode(X[rows].to(dev).float())
        return (f if idx is None else f.index_select(-1, idx)).float().cpu()

    if latents is None:
        counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        for s in range(0, n_train_contexts, batch_size):
            f = encoded(slice(s, min(s + batch_size, n_train_contexts)))
            counts += ((f > fire_threshold) & tr_keep[s:s + batch_size, :, None]).sum((0, 1))
        alive = (counts >= min_fires).nonzero().flatten()
        g = torch.Generator().manual_seed(seed)
        latents = sorted(alive[torch.randperm(alive.numel(), generator=g)[:n_latents]].tolist())
    latents = [int(j) for j in latents]
    if not latents:
        raise SaeforgeError(f"no latent fires {min_fires}+ times on {n_train_contexts} contexts; "
                            "pass more contexts or a smaller min_fires")
    pad = tok.pad_id if tok.pad_id is not None else 0
    idx = torch.as_tensor(latents, dtype=torch.long, device=dev)
    acts = torch.cat([encoded(slice(s, min(s + batch_size, n_ctx)), idx) for s in range(0, n_ctx, batch_size)])
    tr_acts, te_acts = acts[:n_train_contexts], acts[n_train_contexts:]
    tries, scores = [], []
    for s in tqdm(range(0, len(latents), 32), desc="n2g", disable=not progress):
        cols = slice(s, min(s + 32, len(latents)))
        sub = sae_act_fn(sae, model, hook, latents[cols])
        t = build_patterns(sub, tr_tok, tr_acts[..., cols], tr_keep, bos_id=tok.bos_id, pad_id=pad, n_top=n_top,
                           n_random=n_random, max_suffix=max_suffix, keep_frac=keep_frac,
                           fire_threshold=fire_threshold, batch_size=rerun_batch or max(64, batch_size),
                           seed=seed + s)
        tries += t
        scores += score_patterns(t, te_tok, te_acts[..., cols], te_keep, fire_threshold)
    per, expl = {}, {}
    for j, trie, sc in zip(latents, tries, scores):
        pattern = trie.render(tok.token_str)
        per[str(j)] = {**sc, "n_patterns": len(trie)}
        expl[str(j)] = {"pattern": pattern, "precision": sc["precision"], "recall": sc["recall"], "f1": sc["f1"]}
    mean = lambda k: _mean([v[k] for v in per.values()])  # noqa: E731
    summary = {"precision": mean("precision"), "recall": mean("recall"), "f1": mean("f1"),
               "n_latents": len(latents), "n_explained": sum(1 for v in per.values() if v["n_patterns"]),
               "context_len": context_len, "n_train_contexts": n_train_contexts,
               "n_heldout_contexts": n_heldout_contexts}
    return {"summary": summary, "latents": per, "explanations": expl}


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None
