"""Downstream loss: the model's next-token cross-entropy with the SAE spliced in, against ablations.

For every batch of contexts the model runs once clean, once per SAE with the SAE's reconstruction
replacing the activation at every hook it reconstructs (``SAE.output_hooks``), and once per such set of
hooks zero-ablated (activation := 0) and mean-ablated (activation := its mean over the eval tokens, from the
reconstruction pass). Per token we record the cross-entropy of the true next token and KL(clean ‖ modified).

The SAE reads the clean forward's activations at its input hooks (``SAE.input_hooks``, recorded while the
clean logits are computed): a plain SAE its own hook, a transcoder its input hook (its output replaces the
*target* hook), a crosscoder every hook it reads; all of its reconstructions then replace their hooks in one
spliced forward. For an SAE, and for a transcoder whose input precedes its target, the clean activation is
exactly the one the spliced forward reaches the input hook with (nothing upstream has changed). An acausal
crosscoder's reconstruction at an early hook depends on the activations at later hooks, which a single
forward has not computed when it passes the early hook, so its inputs can only come from the clean pass.

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
from saeforge.eval.recon import encode_decode, rows_per_step
from saeforge.hooks import HookPoint, recording, splice
from saeforge.sae.base import SAE

PER_TOKEN_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "kl_zero", "kl_mean")


@dataclass
class SpliceTarget:
    """One SAE to splice: it reads ``inputs`` (aligned with ``sae.input_hooks()``) and writes ``outputs``
    (aligned with ``sae.output_hooks()``; the input for a plain SAE, the target hook for a transcoder)."""

    sae: SAE
    inputs: list[HookPoint]
    outputs: list[HookPoint]

    @property
    def key(self) -> tuple[str, ...]:
        """The output hooks' names: SAEs that write the same hooks share their ablations."""
        return tuple(hp.name for hp in self.outputs)

    def _pick(self, acts: dict[str, Tensor], points: list[HookPoint], names: list[str],
              mask: Tensor | None) -> dict[str, Tensor]:
        def pick(hp: HookPoint) -> Tensor:
            a = acts[hp.name]
            a = a if mask is None else a[mask.to(a.device)]
            return a.to(next(self.sae.parameters()).device)  # device_map: rows to the SAE's GPU

        return dict(zip(names, (pick(hp) for hp in points)))

    def rows(self, acts: dict[str, Tensor], mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The SAE's input and target rows (its ``inputs_from``) out of ``{hook point name: activation}``
        holding its input and output hooks, at ``mask`` positions (every row when None)."""
        named = {**self._pick(acts, self.inputs, self.sae.input_hooks(), mask),
                 **self._pick(acts, self.outputs, self.sae.output_hooks(), mask)}
        return self.sae.inputs_from(named)


def splice_mask(keep: Tensor, valid: Tensor, splice_all: bool) -> Tensor:
    """[B, T] positions whose activation gets replaced."""
    return valid.clone() if splice_all else keep & valid


def loss_mask(keep: Tensor, valid: Tensor, splice_all: bool) -> Tensor:
    """[B, T-1] positions t whose prediction of token t+1 is scored."""
    return splice_mask(keep, valid, splice_all)[:, :-1] & valid[:, 1:]


@torch.no_grad()
def reconstruct_rows(sae: SAE, x: Tensor) -> list[Tensor]:
    """``sae(x)`` for input rows ``x`` (in steps that keep the codes small), one ``[N, d]`` per output hook."""
    step = rows_per_step(sae.cfg.d_sae)
    x = x.to(next(sae.parameters()).device)  # device_map: the hook's layer may sit on another GPU
    if not x.shape[0]:
        return sae.split_outputs(x.new_zeros(0, sae.cfg.d_out))
    parts = [sae.split_outputs(encode_decode(sae, x[i:i + step])[1]) for i in range(0, x.shape[0], step)]
    return [torch.cat(p) for p in zip(*parts)]


def _replace(act: Tensor, mask: Tensor, new_rows: Tensor) -> Tensor:
    out = act.clone()
    out[mask.to(act.device)] = new_rows.to(device=act.device, dtype=act.dtype)
    return out


@contextmanager
def rows_spliced(model: Any, rows: dict[HookPoint, Tensor], mask: Tensor) -> Iterator[None]:
    """While active, each hook's activation at ``mask`` positions is its given ``[n, d]`` rows."""
    def make_fn(new: Tensor):
        def fn(act: Tensor) -> Tensor:
            return _replace(act, mask.to(act.device), new)

        return fn

    with ExitStack() as st:
        for hp, new in rows.items():
            st.enter_context(splice(model, hp, make_fn(new)))
        yield


@contextmanager
def sae_spliced(model: Any, target: SpliceTarget, mask: Tensor, clean: dict[str, Tensor]) -> Iterator[None]:
    """While active, every output hook of ``target`` holds, at ``mask`` positions, the SAE's reconstruction from
    the ``clean`` activations at its hooks (``{hook point name: [B, T, d]}``)."""
    x, _ = target.rows(clean, mask)
    parts = reconstruct_rows(target.sae, x)
    with rows_spliced(model, dict(zip(target.outputs, parts)), mask):
        yield


@contextmanager
def ablated(model: Any, hooks: list[HookPoint], mask: Tensor, values: list[Tensor] | None) -> Iterator[None]:
    """While active, each hook's activation at ``mask`` positions is its ``values`` entry (a [d] vector) or zero."""

    def make_fn(value: Tensor | None):
        def fn(act: Tensor) -> Tensor:
            out = act.clone()
            m = mask.to(act.device)
            out[m] = 0 if value is None else value.to(device=act.device, dtype=act.dtype)
            return out

        return fn

    with ExitStack() as st:
        for j, hp in enumerate(hooks):
            st.enter_context(splice(model, hp, make_fn(None if values is None else values[j])))
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
    means: dict[tuple[str, ...], list[Tensor]],
    splice_all: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Per-token CE / KL arrays (float32, one dict per SAE in ``targets``) for one batch of contexts.

    ``means[target.key]`` are the mean activations (one [d] per output hook) used for mean ablation.
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

    with recording(lm.model, [hp for t in targets for hp in t.inputs + t.outputs]) as clean:
        lp_clean = logp()
    clean = dict(clean)
    ce_clean, _ = _ce_kl(lp_clean, tgt, None)
    ablations: dict[tuple[str, ...], dict[str, Tensor]] = {}
    for t in targets:
        if t.key in ablations:
            continue
        res = {}
        for kind, values in (("zero", None), ("mean", means[t.key])):
            with ablated(lm.model, t.outputs, smask, values):
                ce, kl = _ce_kl(logp(), tgt, lp_clean)
            res[f"ce_{kind}"], res[f"kl_{kind}"] = ce, kl
        ablations[t.key] = res
    out = []
    for t in targets:
        with sae_spliced(lm.model, t, smask, clean):
            ce, kl = _ce_kl(logp(), tgt, lp_clean)
        rec = {"ce_clean": ce_clean, "ce_spliced": ce, "kl": kl, **ablations[t.key]}
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
