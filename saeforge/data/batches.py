"""The one source of text batches: documents -> packed contexts -> :class:`ContextBatch` of ``B`` contexts.

Harvest, the live activation stream, eval, adapt (training and its report) and the dashboard all read their
text through :func:`context_batches`, so the same data and packing settings give the same contexts everywhere.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from saeforge.data.packing import Context, ContextBatch, batch_contexts, pack
from saeforge.data.text import iter_documents
from saeforge.errors import SaeforgeError


def documents(data: str | Iterable[str], text_field: str = "text", split: str = "train") -> Iterable[str]:
    """Documents of a path / data set name (:func:`~saeforge.data.text.iter_documents`) or of an iterable of
    strings (passed through)."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return iter_documents(str(data), text_field=text_field, split=split)
    return data


def _capped(contexts: Iterable[Context], max_tokens: int | None) -> Iterator[Context]:
    """Contexts until ``max_tokens`` kept rows exist; the last one's keep mask is cut to exactly that many."""
    kept = 0
    for ctx in contexts:
        n = int(ctx.keep.sum())
        if max_tokens is not None and kept + n >= max_tokens:
            idx = torch.nonzero(ctx.keep).flatten()
            ctx.keep[idx[max_tokens - kept:]] = False
            yield ctx
            return
        kept += n
        yield ctx


def context_batches(
    tokenizer: Any,
    data: str | Iterable[str],
    *,
    context_len: int,
    batch_size: int,
    text_field: str = "text",
    split: str = "train",
    keep_special: bool = False,
    max_tokens: int | None = None,
    loop: bool = False,
    skip: int = 0,
    require: bool = False,
) -> Iterator[ContextBatch]:
    """Packed batches of ``data``, stopping once ``max_tokens`` kept rows exist (the last context's keep mask
    cut so that exactly ``max_tokens`` rows are kept).

    ``loop`` restarts the data when it ends (endless; needs a path, not a one-shot iterable); ``skip`` drops the
    first batches (a resumed run); ``require`` (implied by ``loop``) refuses data that gives no complete context.
    """
    produced = 0
    for _epoch in itertools.count():
        contexts = pack(documents(data, text_field, split), tokenizer, context_len=context_len,
                        keep_special=keep_special)
        any_batch = False
        for batch in batch_contexts(_capped(contexts, max_tokens), batch_size):
            any_batch = True
            produced += 1
            if produced > skip:
                yield batch
        if not any_batch and (loop or require):
            raise SaeforgeError(f"{data} holds no complete context of {context_len} tokens; use more text")
        if not loop:
            return


def first_contexts(tokenizer: Any, data: str | Iterable[str], n: int, *, context_len: int,
                   text_field: str = "text", split: str = "train") -> ContextBatch:
    """The first ``n`` packed contexts of ``data`` as one batch; fewer than ``n`` is an error."""
    batch = next(context_batches(tokenizer, data, context_len=context_len, batch_size=n, text_field=text_field,
                                 split=split), None)
    got = 0 if batch is None else batch.tokens.shape[0]
    if got < n:
        raise SaeforgeError(f"the data holds only {got} contexts of {context_len} tokens, {n} needed; "
                            "pass more text, or fewer contexts (eval --n2g-contexts / --ablation-positions)")
    return batch
