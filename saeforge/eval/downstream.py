"""Downstream loss: the model's next-token cross-entropy with the SAE spliced in, against ablations.

For every batch of contexts the model runs once clean, once per SAE with the SAE's reconstruction
replacing the activation at its hook (for a transcoder: the activation at its *target* hook is replaced by
``sae(x)``, ``x`` captured at its input hook in the same forward pass), and once per hook zero-ablated
(activation := 0) and mean-ablated (activation := its mean over the eval tokens, from the reconstruction
pass). Per token we record the cross-entropy of the true next token and KL(clean ‖ modified).

Positions. By default only positions whose ``keep`` mask is True (ordinary text tokens, not BOS / special /
padding) are replaced; elsewhere the original activation stays, the convention of SAELens's evaluator for
BOS (the BOS residual is an outlier the SAE was never trained on). The loss is averaged over the same
positions: position t (kept) predicting token t+1 (not padding). ``splice_all=True`` replaces and scores
every non-padding position instead.

Scores (Bricken et al. 2023 "loss recovered"; SAEBench's "CE loss score"):

* ΔCE = CE_spliced − CE_clean
* CE recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)   (1 = lossless, 0 = as bad as zeroing)
* the same with CE_mean in place of CE_zero (mean ablation is the stricter baseline)
* KL recovered = (KL_zero − KL_spliced) / KL_zero   (SAEBench's KL-divergence score)
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saeforge.data.packing import ContextBatch
from saeforge.errors import SaeforgeError
from saeforge.eval.recon import encode_decode, rows_per_step
from saeforge.hooks import HookPoint, splice
from saeforge.sae.base import SAE

PER_TOKEN_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "kl_zero", "kl_mean")


@dataclass
class SpliceTarget:
    """One SAE to splice: read ``inp`` (its input hook), write ``out`` (its target hook; == inp for an SAE)."""

    sae: SAE
    inp: HookPoint
    out: HookPoint


def splice_mask(keep: Tensor, valid: Tensor, splice_all: bool) -> Tensor:
    """[B, T] positions whose activation gets replaced."""
    return valid.clone() if splice_all else keep & valid


def loss_mask(keep: Tensor, valid: Tensor, splice_all: bool) -> Tensor:
    """[B, T-1] positions t whose prediction of token t+1 is scored."""
    return splice_mask(keep, valid, splice_all)[:, :-1] & valid[:, 1:]


@torch.no_grad()
def _reconstruct(sae: SAE, rows: Tensor) -> Tensor:
    step = rows_per_step(sae.cfg.d_sae)
    rows = rows.to(next(sae.parameters()).device)  # device_map: the hook's layer may sit on another GPU
    return torch.cat([encode_decode(sae, rows[i:i + step])[1] for i in range(0, rows.shape[0], step)]) \
        if rows.shape[0] else rows.new_zeros(0, sae.cfg.d_out)


def _replace(act: Tensor, mask: Tensor, new_rows: Tensor) -> Tensor:
    out = act.clone()
    out[mask.to(act.device)] = new_rows.to(device=act.device, dtype=act.dtype)
    return out


@contextmanager
def sae_spliced(model: Any, target: SpliceTarget, mask: Tensor) -> Iterator[None]:
    """While active, ``target.out``'s activation at ``mask`` positions is the SAE's reconstruction."""
    sae, inp, out = target.sae, target.inp, target.out
    if inp == out:
        def fn(act: Tensor) -> Tensor:
            m = mask.to(act.device)
            return _replace(act, m, _reconstruct(sae, act[m]))

        with splice(model, out, fn):
            yield
        return

    stash: dict[str, Tensor] = {}

    def record(act: Tensor) -> Tensor:
        stash["x"] = act
        return act

    def fn_tc(act: Tensor) -> Tensor:
        if "x" not in stash:
            raise SaeforgeError(
                f"transcoder input hook {inp.name!r} did not run before its target {out.name!r}; "
                "the input must come earlier in the forward pass"
            )
        x = stash.pop("x")
        m = mask.to(act.device)
        return _replace(act, m, _reconstruct(sae, x[m.to(x.device)]))

    with ExitStack() as st:
        st.enter_context(splice(model, inp, record))
        st.enter_context(splice(model, out, fn_tc))
        yield


@contextmanager
def ablated(model: Any, hook: HookPoint, mask: Tensor, value: Tensor | None) -> Iterator[None]:
    """While active, ``hook``'s activation at ``mask`` positions is ``value`` (a [d] vector) or zero."""

    def fn(act: Tensor) -> Tensor:
        out = act.clone()
        m = mask.to(act.device)
        out[m] = 0 if value is None else value.to(device=act.device, dtype=act.dtype)
        return out

    with splice(model, hook, fn):
        yield


def _ce_kl(logp: Tensor, targets: Tensor, logp_clean: Tensor | None) -> tuple[Tensor, Tensor | None]:
    ce = -logp.gather(1, targets[:, None])[:, 0]
    if logp_clean is None:
        return ce, None
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
    return ce, kl


@torch.no_grad()
def downstream_batch(
    lm: Any,
    batch: ContextBatch,
    targets: list[SpliceTarget],
    means: dict[str, Tensor],
    splice_all: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Per-token CE / KL arrays (float32, one dict per SAE in ``targets``) for one batch of contexts.

    ``means[hook_name]`` is the mean activation used for mean ablation at that (output) hook.
    """
    tokens, doc, keep = batch.tokens, batch.doc, batch.keep
    valid = doc >= 0
    am = None if bool(valid.all()) else valid.long()
    smask = splice_mask(keep, valid, splice_all)
    lmask = loss_mask(keep, valid, splice_all)
    dev = lm.device
    lm_dev = lmask.to(dev)
    tgt = tokens[:, 1:].to(dev)[lm_dev]

    def logp() -> Tensor:
        logits = lm.logits(tokens, am)
        return F.log_softmax(logits[:, :-1][lm_dev].float(), dim=-1)

    lp_clean = logp()
    ce_clean, _ = _ce_kl(lp_clean, tgt, None)
    ablations: dict[str, dict[str, Tensor]] = {}
    for t in targets:
        name = t.out.name
        if name in ablations:
            continue
        res = {}
        for kind, value in (("zero", None), ("mean", means[name])):
            with ablated(lm.model, t.out, smask, value):
                ce, kl = _ce_kl(logp(), tgt, lp_clean)
            res[f"ce_{kind}"], res[f"kl_{kind}"] = ce, kl
        ablations[name] = res
    out = []
    for t in targets:
        with sae_spliced(lm.model, t, smask):
            ce, kl = _ce_kl(logp(), tgt, lp_clean)
        rec = {"ce_clean": ce_clean, "ce_spliced": ce, "kl": kl, **ablations[t.out.name]}
        rec = {k: v.float().cpu().numpy() for k, v in rec.items()}
        rec["target"] = tgt.to(torch.int32).cpu().numpy()
        out.append(rec)
    return out


class DownstreamStats:
    """float64 sums of the per-token losses of one SAE."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = dict.fromkeys(PER_TOKEN_KEYS, 0.0)

    def update(self, rec: dict[str, np.ndarray]) -> None:
        self.n += int(rec["ce_clean"].shape[0])
        for k in PER_TOKEN_KEYS:
            self.sums[k] += float(np.asarray(rec[k], dtype=np.float64).sum())

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        m = {k: v / n for k, v in self.sums.items()}
        return {
            "n_tokens": self.n,
            "ce_clean": m["ce_clean"],
            "ce_spliced": m["ce_spliced"],
            "ce_zero": m["ce_zero"],
            "ce_mean": m["ce_mean"],
            "delta_ce": m["ce_spliced"] - m["ce_clean"],
            "kl": m["kl"],
            "kl_zero": m["kl_zero"],
            "kl_mean": m["kl_mean"],
            "ce_recovered": _ratio(m["ce_zero"] - m["ce_spliced"], m["ce_zero"] - m["ce_clean"]),
            "ce_recovered_mean": _ratio(m["ce_mean"] - m["ce_spliced"], m["ce_mean"] - m["ce_clean"]),
            "kl_recovered": _ratio(m["kl_zero"] - m["kl"], m["kl_zero"]),
        }

    def merge(self, other: "DownstreamStats") -> None:
        self.n += other.n
        for k in PER_TOKEN_KEYS:
            self.sums[k] += other.sums[k]

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sums": dict(self.sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])
        self.sums = {k: float(state["sums"][k]) for k in PER_TOKEN_KEYS}


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan
