"""Output-folder locks: one writer per folder at a time.

A command that writes a folder holds an exclusive ``flock`` on ``<folder>/.saeforge.lock`` while it runs; a
second writer is refused at once with one line. The kernel drops the lock when the holder exits, however it
exits (kill -9 included), so a crashed run never leaves a stale lock behind; the empty lock file itself stays
(harmless: its bytes and times never change). In a ``torchrun`` group only rank 0 takes it: the other ranks
write the folder as its partners, not as rivals. While it holds the lock a writer removes temp files of
interrupted atomic writes (``.<name>.*.tmp``, see :mod:`saeforge.io`), which no other process can be writing.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from saeforge.errors import SaeforgeError

LOCK_FILE = ".saeforge.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; locking is skipped there
    fcntl = None  # type: ignore[assignment]


def _rank() -> int:
    """This process's rank in a torch.distributed launch (``RANK``), 0 when not launched that way."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def remove_temp_files(folder: Path, depth: int = 2) -> None:
    """Delete leftovers of interrupted atomic writes (``.<name>.<random>.tmp``) in ``folder`` and its
    sub-folders down to ``depth`` levels (per-SAE folders of a group run, a dashboard's ``.build``)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
        elif depth > 0 and p.is_dir() and not p.is_symlink():
            remove_temp_files(p, depth - 1)


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str, transient: bool = False) -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if needed) for the ``with`` block. ``transient`` removes the
    lock file afterwards (for folders read by other tools, e.g. a converted SAE)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SaeforgeError(f"{folder} is a file; pass a folder path as --out")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if fcntl is None or _rank() != 0:  # in a torchrun group, rank 0 holds the lock for every rank
            yield folder
        else:
            yield from _locked(folder, command, transient)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                (folder / LOCK_FILE).unlink()
                folder.rmdir()
        raise


def _locked(folder: Path, command: str, transient: bool) -> Iterator[Path]:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SaeforgeError(
                f"{folder} is being written by another saeforge process (`saeforge {command}` refuses to share "
                "it); wait for that one to finish or pick another --out"
            ) from None
        remove_temp_files(folder)
        yield folder
        if transient:
            with contextlib.suppress(OSError):
                (folder / LOCK_FILE).unlink()
    finally:
        os.close(fd)
