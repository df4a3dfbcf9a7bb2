"""Fault injection for the crash tests: kill this process at a named point.

``SAEFORGE_KILL_AT="<point>[#<n>]"`` sends SIGKILL to the process the ``n``-th time (default 1st) it passes
``point``. Points: ``before-rename:<file>`` (a file is fully written to its temp sibling, not yet renamed),
``wrote:<file>`` (a safetensors file was just renamed into place), ``harvest:shard`` (a shard is listed in the
manifest), ``train:step`` (a training step finished). Without the variable :func:`point` is a dict lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("SAEFORGE_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition("#")
    if name != target:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
