"""Batches of packed contexts for adaptation and its report (deterministic, endless when asked)."""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from saeforge.data.packing import batch_contexts, pack
from saeforge.data.text import iter_documents
from saeforge.errors import SaeforgeError


def context_batches(data: str, tokenizer, context_len: int, batch: int, text_field: str = "text",
                    loop: bool = False, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens [B, T], keep [B, T])``; ``loop`` restarts the data; ``skip`` drops the first batches."""
    produced = 0
    for epoch in itertools.count():
        any_batch = False
        docs = iter_documents(data, text_field=text_field)
        for tokens, _doc, _pos, keep in batch_contexts(pack(docs, tokenizer, context_len), batch):
            any_batch = True
            produced += 1
            if produced > skip:
                yield tokens, keep
        if not any_batch:
            raise SaeforgeError(f"{data} holds no complete context of {context_len} tokens; use more text")
        if not loop:
            return
