"""Activations: harvest them into an on-disk cache, and stream them (cached or live) to the trainer."""
from saeforge.activations.cache import ActivationCache, HarvestConfig, harvest
from saeforge.activations.stream import (
    ActivationBatch,
    ActivationStream,
    Stream,
    CachedStream,
    LiveStream,
    ShuffleBuffer,
    StreamConfig,
    open_stream,
)

__all__ = [
    "ActivationBatch", "ActivationCache", "ActivationStream", "Stream", "CachedStream", "HarvestConfig", "LiveStream",
    "ShuffleBuffer", "StreamConfig", "harvest", "open_stream",
]
