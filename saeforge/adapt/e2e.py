"""End-to-end SAE training: the SAE spliced into the model and trained on KL(clean || spliced) next-token
distributions (``saeforge adapt`` with ``trainable="sae"``; ``saeforge train --objective kl``)."""
from __future__ import annotations

from pathlib import Path

from saeforge.activations.stream import LiveStream
from saeforge.adapt.config import AdaptConfig
from saeforge.adapt.trainer import build, fit, save
from saeforge.models import LoadedModel
from saeforge.sae.base import SAE, SAEConfig, create_sae
from saeforge.tracking import TrackingConfig

INIT_ROWS = 16384  # activation rows a fresh SAE's data-dependent initialisation reads


def fresh_sae(loaded: LoadedModel, cfg: SAEConfig, data: str, *, context_len: int, seed: int,
              text_field: str) -> SAE:
    """A new SAE of ``cfg``, initialised from the first :data:`INIT_ROWS` activations of ``data`` at its hook."""
    sae = create_sae(cfg)
    stream = LiveStream(loaded, [cfg.hook], data, batch_size=INIT_ROWS, context_len=context_len, seed=seed,
                        text_field=text_field)
    x = next(iter(stream.iterate(0))).acts[cfg.hook]
    sae.init_from_data(x, x)
    return sae


def train_e2e(cfg: AdaptConfig, out: str | Path, resume: bool = False, progress: bool = True,
              tracking: TrackingConfig | None = None) -> SAE:
    """Train ``cfg.saes[0]`` end to end (``cfg.trainable`` must be ``"sae"``); the SAE is saved in ``out`` (and,
    with the run's manifest, in ``out/saes/0``)."""
    out = Path(out)
    ad = build(cfg)
    fit(ad, cfg, out, resume=resume, progress=progress, tracking=tracking)
    save(ad, cfg, out)
    ad.saes[0].save(out)
    return ad.saes[0]
