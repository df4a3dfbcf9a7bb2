"""Experiment trackers (``--log-to wandb|tensorboard``): copies of the metric lines, nothing more.

``metrics.jsonl`` stays the source of truth; a tracker receives every record right after it is appended
there, through the libraries' own APIs (``torch.utils.tensorboard.SummaryWriter``, ``wandb``). Off by default.

Interface (what the trainers call)::

    tracker = open_tracker(TrackingConfig(log_to=("tensorboard",)), out, config={...}, start_step=0)
    tracker.log(name, folder, record)   # after each metrics.jsonl line; name "" for a lone SAE
    tracker.close()

Only the main process (global rank 0) opens real trackers; every other process gets a no-op one. TensorBoard
writes ``<folder>/tensorboard/`` next to each SAE's ``metrics.jsonl`` (``tensorboard --logdir OUT``); W&B opens
one run for the whole command and logs ``<name>/<metric>`` (just ``<metric>`` for a lone SAE), with
``WANDB_MODE=offline`` etc. honoured as usual. Scalars only: numbers that are finite are logged, the rest skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from saeforge.config import JsonConfig
from saeforge.errors import SaeforgeError
from saeforge import distributed as dist

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the pip extra that provides it
SKIP = {"step"}  # the x axis, not a metric


@dataclass
class TrackingConfig(JsonConfig):
    FLAGS: ClassVar[dict[str, str]] = {"log_to": "--log-to", "project": "--wandb-project"}

    log_to: tuple[str, ...] = ()  # any of BACKENDS; empty: metrics.jsonl only
    project: str = "saeforge"  # W&B project
    run_name: str | None = None  # W&B run name (default: the output folder's name)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [b for b in self.log_to if b not in BACKENDS]
        self.require(not bad, "log_to", f"a list of {' / '.join(BACKENDS)}")

    @classmethod
    def from_flags(cls, values: list[str] | None, project: str = "saeforge",
                   run_name: str | None = None) -> "TrackingConfig":
        """``--log-to`` values, each repeatable or a comma list (``--log-to wandb,tensorboard``)."""
        names = [v.strip().lower() for item in values or [] for v in item.split(",") if v.strip()]
        bad = [n for n in names if n not in BACKENDS]
        if bad:
            raise SaeforgeError(f"--log-to {bad[0]!r} is not a tracker; use {' or '.join(BACKENDS)}")
        return cls(log_to=tuple(dict.fromkeys(names)), project=project, run_name=run_name)


def require(cfg: TrackingConfig) -> None:
    """Fail early, in one line naming the pip install, when a chosen tracker's library is missing."""
    for backend in cfg.log_to:
        try:
            if backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise SaeforgeError(f"--log-to {backend} needs the {backend} package: "
                                f"pip install 'saeforge-toolkit[{BACKENDS[backend]}]' (or pip install {backend})"
                                ) from None


class Tracker(Protocol):
    def log(self, name: str, folder: Path, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _Null:
    def log(self, name: str, folder: Path, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, start_step: int):
        self.start_step = start_step
        self.writers: dict[Path, Any] = {}

    def log(self, name: str, folder: Path, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = self.writers.get(folder)
        if w is None:  # purge_step: a resumed run drops the events past its checkpoint, as metrics.jsonl does
            w = self.writers[folder] = SummaryWriter(str(Path(folder) / "tensorboard"),
                                                     purge_step=self.start_step + 1 if self.start_step else None)
        step = int(record["step"])
        for k, v in _scalars(record).items():
            w.add_scalar(k, v, global_step=step)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


class _WandB:
    def __init__(self, cfg: TrackingConfig, out: Path, config: dict[str, Any] | None, resume: bool):
        import wandb

        self.run = wandb.init(project=cfg.project, name=cfg.run_name or out.resolve().name, dir=str(out),
                              config=config or {}, resume="allow" if resume else None)

    def log(self, name: str, folder: Path, record: dict[str, Any]) -> None:
        prefix = f"{name}/" if name else ""
        self.run.log({prefix + k: v for k, v in _scalars(record).items()}, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class _Many:
    def __init__(self, parts: list[Any]):
        self.parts = parts

    def log(self, name: str, folder: Path, record: dict[str, Any]) -> None:
        for p in self.parts:
            p.log(name, folder, record)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def open_tracker(cfg: TrackingConfig | None, out: str | Path, config: dict[str, Any] | None = None,
                 start_step: int = 0) -> Tracker:
    """The trackers ``cfg`` names, on the main process; a no-op elsewhere or when ``cfg`` names none."""

    if cfg is None or not cfg.log_to or not dist.is_main():
        return _Null()
    require(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[Any] = []
    for backend in cfg.log_to:
        parts.append(_TensorBoard(start_step) if backend == "tensorboard"
                     else _WandB(cfg, out, config, resume=start_step > 0))
    return parts[0] if len(parts) == 1 else _Many(parts)


def add_args(p: Any) -> None:
    """The tracking flags, for ``train``, ``sweep`` and ``adapt train``."""
    g = p.add_argument_group("tracking")
    g.add_argument("--log-to", action="append", metavar="TRACKER[,TRACKER]", default=[],
                   help="also send the metric lines to wandb and/or tensorboard (repeatable or a comma list; "
                        "metrics.jsonl is written either way); needs pip install 'saeforge-toolkit[wandb]' / "
                        "'[tensorboard]'")
    g.add_argument("--wandb-project", default="saeforge", help="W&B project for --log-to wandb")


def from_args(args: Any) -> TrackingConfig:
    """The TrackingConfig of parsed ``add_args`` flags, its libraries checked (before any work starts)."""
    cfg = TrackingConfig.from_flags(getattr(args, "log_to", None), getattr(args, "wandb_project", "saeforge"))
    require(cfg)
    return cfg
