"""Adapt a model around frozen SAEs with LoRA (Chen, Engels & Tegmark 2025), and the end-to-end baseline.

Names load on first use, so reading :class:`AdaptConfig` (the CLI's flags) does not import peft.
"""
from __future__ import annotations

from saeforge.lazy import lazy_getattr

_LAZY = {
    "AdaptConfig": "saeforge.adapt.config",
    "adapt_report": "saeforge.adapt.report",
    "report_markdown": "saeforge.adapt.report",
    "Adapted": "saeforge.adapt.trainer",
    "build": "saeforge.adapt.trainer",
    "fit": "saeforge.adapt.trainer",
    "save": "saeforge.adapt.trainer",
    "load": "saeforge.adapt.trainer",
    "merge": "saeforge.adapt.trainer",
    "fresh_sae": "saeforge.adapt.e2e",
    "train_e2e": "saeforge.adapt.e2e",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
