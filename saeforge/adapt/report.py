"""The adaptation report: how much of the CE gap that splicing opens does the adapter close?

On held-out text: L_base (clean model), L_SAE (SAEs spliced, no adapter), L_SAE+LoRA (spliced, adapter on),
gap closed = (L_SAE − L_SAE+LoRA) / (L_SAE − L_base), KL(clean ‖ ·) before and after, the CE of the adapted
model with the SAEs removed, and each SAE's FVU and L0 measured inside the adapted model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from saeforge.adapt.objective import next_token_ce, next_token_kl
from saeforge.adapt.splice import SpliceState, spliced_logits
from saeforge.data.batches import context_batches
from saeforge.eval.downstream import SpliceTarget
from saeforge.sae.base import SAE


class _SAEStats:
    """Accumulates FVU and L0 of one SAE on the activations that reach it (kept positions only)."""

    def __init__(self) -> None:
        self.err = self.sq = 0.0
        self.sum: torch.Tensor | None = None
        self.n = 0
        self.l0 = 0.0

    def add(self, sae: SAE, x: torch.Tensor, ys: list[torch.Tensor], keep: torch.Tensor) -> None:
        """``x`` the SAE's input, ``ys`` the activations at its output hooks (its targets), at every position."""
        dev = next(sae.parameters()).device  # device_map: the rows move to the SAE's GPU
        x = x.float()[keep.to(x.device)].to(dev)
        y = torch.cat([a.float()[keep.to(a.device)].to(dev) for a in ys], -1)
        with torch.no_grad():
            f = sae.encode(x)
            rec = torch.cat([r.reshape(y.shape[0], -1) for r in sae.split_outputs(sae.decode(f))], -1)
        self.err += (y - rec).double().pow(2).sum().item()
        self.sq += y.double().pow(2).sum().item()
        s = y.double().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.n += y.shape[0]
        self.l0 += (f != 0).sum().item()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {"fvu": float("nan"), "l0": float("nan")}
        var = self.sq - (self.sum.pow(2).sum().item() / self.n)
        return {"fvu": self.err / max(var, 1e-12), "l0": self.l0 / self.n}


def adapt_report(model: torch.nn.Module, tokenizer, saes: Sequence[SAE], hooks: Sequence[SpliceTarget],
                 data: str, adapter_off, n_tokens: int = 100_000, context_len: int = 128, batch: int = 16,
                 replace_special: bool = False, text_field: str = "text", progress: bool = True) -> dict:
    """``adapter_off()`` is a context manager that disables the adapter (a no-op when there is none). ``hooks``
    are the SAEs' splice targets (saeforge.adapt.splice.resolve_sae_hooks)."""
    keys = ("base", "sae", "sae_lora", "lora")
    ce = {k: 0.0 for k in keys}
    kl = {"sae": 0.0, "sae_lora": 0.0}
    n_ce = n_kl = 0
    stats = [_SAEStats() for _ in saes]
    state = SpliceState()
    device = next(model.parameters()).device
    seen = 0
    pbar = tqdm(total=n_tokens, unit="tok", desc="adapt report", disable=not progress)
    was_training = model.training
    model.eval()
    for cb in context_batches(tokenizer, data, context_len=context_len, batch_size=batch, text_field=text_field,
                              require=True):
        tokens, keep = cb.tokens.to(device), cb.keep.to(device)
        state.keep = keep
        logits = {}
        with torch.no_grad():
            with adapter_off():
                logits["base"] = model(input_ids=tokens).logits
                logits["sae"] = spliced_logits(model, tokens, saes, hooks, state, replace_special)
            logits["lora"] = model(input_ids=tokens).logits
            # measure each SAE on what reaches it in the adapted model
            record = [_recorder(st, sae, keep) for st, sae in zip(stats, saes)]
            logits["sae_lora"] = spliced_logits(model, tokens, saes, hooks, state, replace_special, record)
        for k in keys:
            c, m = next_token_ce(logits[k], tokens, keep)
            ce[k] += (c * m).sum().item()
        n_ce += int(keep[:, 1:].sum().item())
        mask = torch.ones_like(keep)
        for k in kl:
            kl[k] += next_token_kl(logits["base"], logits[k], mask).item() * mask.numel()
        n_kl += mask.numel()
        seen += int(keep.sum().item())
        pbar.update(int(keep.sum().item()))
        if seen >= n_tokens:
            break
    pbar.close()
    model.train(was_training)
    L = {k: v / max(n_ce, 1) for k, v in ce.items()}
    gap = L["sae"] - L["base"]
    return {
        "tokens": seen,
        "ce_base": L["base"], "ce_sae": L["sae"], "ce_sae_lora": L["sae_lora"], "ce_lora_only": L["lora"],
        "gap_closed": (L["sae"] - L["sae_lora"]) / gap if gap > 0 else float("nan"),
        "kl_before": kl["sae"] / max(n_kl, 1), "kl_after": kl["sae_lora"] / max(n_kl, 1),
        "saes": [{"hook": ",".join(hp.name for hp in t.outputs), **st.result()} for st, t in zip(stats, hooks)],
    }


def _recorder(st: _SAEStats, sae: SAE, keep: torch.Tensor):
    def fn(x: torch.Tensor, ys: list[torch.Tensor]) -> None:
        st.add(sae, x, ys, keep)

    return fn


def report_markdown(rep: dict, title: str = "Adaptation report") -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k in ("tokens", "ce_base", "ce_sae", "ce_sae_lora", "gap_closed", "kl_before", "kl_after", "ce_lora_only"):
        v = rep[k]
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "| SAE hook | FVU in adapted model | L0 |", "|---|---|---|"]
    lines += [f"| {s['hook']} | {s['fvu']:.4f} | {s['l0']:.2f} |" for s in rep["saes"]]
    return "\n".join(lines) + "\n"
