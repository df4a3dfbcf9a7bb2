"""Adapt a model around frozen SAEs with LoRA (Chen, Engels & Tegmark 2025), and the end-to-end baseline."""
from saeforge.adapt.config import AdaptConfig
from saeforge.adapt.report import adapt_report, report_markdown
from saeforge.adapt.trainer import Adapted, build, fit, load, merge, save

__all__ = ["AdaptConfig", "Adapted", "build", "fit", "save", "load", "merge", "adapt_report", "report_markdown"]
