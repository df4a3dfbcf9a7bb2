"""SAE architectures. Importing this package registers every architecture module in it."""
from __future__ import annotations

import importlib
import pkgutil

from saeforge.sae.base import (
    SAE,
    SAEConfig,
    TrainStepInput,
    TrainStepOutput,
    architectures,
    create_sae,
    fvu,
    get_arch,
    make_config,
    register,
)

_SKIP = {"base", "geometric_median", "step", "export"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _SKIP and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

load = SAE.load

__all__ = [
    "SAE", "SAEConfig", "TrainStepInput", "TrainStepOutput", "architectures", "create_sae", "fvu",
    "get_arch", "make_config", "register", "load",
]
