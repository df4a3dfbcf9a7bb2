"""Losses on next-token distributions."""
from __future__ import annotations

from torch import Tensor


def next_token_kl(clean_logits: Tensor, logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over positions of KL(p_clean ‖ p) = Σ_v p_clean,v (log p_clean,v − log p_v).

    ``clean_logits, logits [B, T, V]``; ``mask [B, T]`` (bool) selects the positions that count.
    """
    lp_clean = clean_logits.float().log_softmax(-1)
    lp = logits.float().log_softmax(-1)
    kl = (lp_clean.exp() * (lp_clean - lp)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.device, kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def next_token_ce(logits: Tensor, tokens: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-target cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``.

    Returns (ce [B, T-1], mask [B, T-1]); targets that are BOS/pad/special (``keep`` False) do not count.
    """
    lp = logits[:, :-1].float().log_softmax(-1)
    ce = -lp.gather(-1, tokens[:, 1:, None].to(lp.device)).squeeze(-1)
    return ce, keep[:, 1:].to(ce.device)
