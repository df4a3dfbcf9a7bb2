"""saeforge: sparse autoencoders on language-model activations.

The Python API mirrors the CLI::

    from saeforge import load_model, harvest, HarvestConfig, CachedStream, make_config, train, TrainConfig
    from saeforge import load_sae, evaluate, push
"""
from __future__ import annotations

from saeforge.lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "load_model": "saeforge.models",
    "LoadedModel": "saeforge.models",
    "HarvestConfig": "saeforge.activations.cache",
    "harvest": "saeforge.activations.cache",
    "ActivationCache": "saeforge.activations.cache",
    "CachedStream": "saeforge.activations.stream",
    "LiveStream": "saeforge.activations.stream",
    "open_stream": "saeforge.activations.stream",
    "StreamConfig": "saeforge.activations.stream",
    "SAE": "saeforge.sae",
    "SAEConfig": "saeforge.sae",
    "make_config": "saeforge.sae",
    "create_sae": "saeforge.sae",
    "architectures": "saeforge.sae",
    "TrainConfig": "saeforge.train",
    "Trainer": "saeforge.train",
    "train": "saeforge.train",
    "build_grid": "saeforge.train.sweep",
    "run_sweep": "saeforge.train.sweep",
    "load_sae": "saeforge.formats",
    "save_sae_as": "saeforge.formats",
    "evaluate": "saeforge.eval",
    "AdaptConfig": "saeforge.adapt",
    "push": "saeforge.publish",
}


# submodules load on first use, so ``import saeforge`` stays fast (torch/transformers load when needed)
__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["__version__", *_LAZY]
