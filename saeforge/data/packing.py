"""Pack tokenised documents into fixed-length contexts, SAELens style.

The rule (the same one SAELens' ``ActivationsStore`` uses with ``prepend_bos=True``):

1. Each document is encoded with the model's tokenizer, BOS first (``tokenizer.encode(text, add_bos)``;
   BERT-style tokenizers add their own CLS/SEP there). The token *stream* is the concatenation of the
   encoded documents, in order.
2. Contexts are consecutive windows of that stream. A window takes ``context_len`` tokens when the
   next stream token is BOS; otherwise a BOS is put in front and the window takes ``context_len - 1``
   fresh stream tokens. So every context starts with BOS -- the model never sees a context that starts
   mid-document without the attention-sink token it was trained with -- and no stream token is used
   twice. Without a BOS token (or with ``add_bos=False``) windows are plain ``context_len`` slices.
3. The last, partial window is dropped (``drop_last=True``) or padded with ``pad_id`` (keep=False).

Each context records, per position, the global document index (``doc``), the position of the token
inside its encoded document (``pos``, BOS = 0) and a ``keep`` mask that is False at BOS, padding and
special ids (by default only ordinary text tokens are worth an SAE's capacity: the BOS residual is a
huge-norm outlier). Padding has ``doc = pos = -1``; a BOS prepended to a window gets the ``doc`` of the
token after it and ``pos = 0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import torch

from saeforge.errors import SaeforgeError


@dataclass
class Context:
    """One packed context of length T; see the module docstring for the meaning of each field."""

    tokens: torch.Tensor  # int64 [T]
    doc: torch.Tensor  # int64 [T]; -1 at padding
    pos: torch.Tensor  # int64 [T]; -1 at padding
    keep: torch.Tensor  # bool [T]


def _excluded_ids(tokenizer: Any, keep_special: bool) -> set[int]:
    if keep_special:
        return set()
    ids = set(getattr(tokenizer, "special_ids", ()) or ())
    for name in ("bos_id", "pad_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    return ids


def pack(
    docs: Iterable[str],
    tokenizer: Any,
    context_len: int = 128,
    add_bos: bool = True,
    drop_last: bool = True,
    keep_special: bool = False,
) -> Iterator[Context]:
    """Yield contexts of exactly ``context_len`` tokens from ``docs`` (deterministic; see module docstring).

    ``keep_special=True`` keeps BOS/EOS/special positions in the ``keep`` mask too (padding never).
    """
    bos = getattr(tokenizer, "bos_id", None) if add_bos else None
    if bos is not None and context_len < 2:
        raise SaeforgeError(f"context_len {context_len} is too short to hold BOS plus a token; use at least 2")
    if context_len < 1:
        raise SaeforgeError(f"context_len must be positive, got {context_len}")
    excluded = torch.tensor(sorted(_excluded_ids(tokenizer, keep_special)), dtype=torch.long)
    pad = getattr(tokenizer, "pad_id", None)
    pad = 0 if pad is None else int(pad)

    # The stream buffer: parallel lists of token, doc index and in-document position.
    toks: list[int] = []
    docs_i: list[int] = []
    poss: list[int] = []
    start = 0  # index in the buffer of the next unused stream token

    def emit(t: list[int], d: list[int], p: list[int], n_real: int) -> Context:
        tokens = torch.tensor(t, dtype=torch.long)
        keep = ~torch.isin(tokens, excluded)
        keep[n_real:] = False
        return Context(tokens, torch.tensor(d, dtype=torch.long), torch.tensor(p, dtype=torch.long), keep)

    def take_window(final: bool) -> Context | None:
        nonlocal start
        avail = len(toks) - start
        prepend = bos is not None and avail > 0 and toks[start] != bos
        fresh = context_len - 1 if prepend else context_len
        if avail < fresh and not final:
            return None
        n = min(fresh, avail)
        t, d, p = toks[start:start + n], docs_i[start:start + n], poss[start:start + n]
        start += n
        if prepend:
            t, d, p = [bos] + t, [d[0]] + d, [0] + p
        n_real = len(t)
        if n_real < context_len:
            if drop_last or n == 0:
                return None
            fill = context_len - n_real
            t, d, p = t + [pad] * fill, d + [-1] * fill, p + [-1] * fill
        return emit(t, d, p, n_real)

    for doc_index, text in enumerate(docs):
        ids = tokenizer.encode(text, add_bos=add_bos)
        toks.extend(int(i) for i in ids)
        docs_i.extend([doc_index] * len(ids))
        poss.extend(range(len(ids)))
        while (ctx := take_window(final=False)) is not None:
            yield ctx
        if start > 0:  # drop consumed tokens so the buffer stays at most one window + one document
            del toks[:start], docs_i[:start], poss[:start]
            start = 0
    ctx = take_window(final=True)
    if ctx is not None:
        yield ctx


class ContextBatch(NamedTuple):
    """``B`` packed contexts of ``T`` tokens: what harvest, the live stream, eval, adapt and the dashboard read."""

    tokens: torch.Tensor  # int64 [B, T]
    doc: torch.Tensor  # int64 [B, T] document index per token (-1 at padding of a final partial context)
    pos: torch.Tensor  # int64 [B, T] position in the document (-1 at padding)
    keep: torch.Tensor  # bool [B, T] tokens whose rows count (not BOS/special unless asked, not padding)


def batch_contexts(contexts: Iterable[Context], n: int) -> Iterator[ContextBatch]:
    """Group contexts ``n`` at a time into a :class:`ContextBatch` of shape [B, T].

    The last batch may hold fewer than ``n`` contexts.
    """
    if n < 1:
        raise SaeforgeError(f"batch size must be positive, got {n}")
    group: list[Context] = []
    for ctx in contexts:
        group.append(ctx)
        if len(group) == n:
            yield _stack(group)
            group = []
    if group:
        yield _stack(group)


def _stack(group: list[Context]) -> ContextBatch:
    return ContextBatch(
        torch.stack([c.tokens for c in group]),
        torch.stack([c.doc for c in group]),
        torch.stack([c.pos for c in group]),
        torch.stack([c.keep for c in group]),
    )
