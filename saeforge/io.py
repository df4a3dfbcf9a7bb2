"""Atomic file writes: a reader never sees a half-written file.

Each writer writes to a temporary file in the destination folder, flushes and fsyncs it, then renames it
over the destination with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save as _st_save

from saeforge import faults
from saeforge.errors import CorruptFileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files owner-only (0600)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())

        faults.point(f"before-rename:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


CHECKSUM_KEY = "saeforge_sha256"


def _split_safetensors(data: bytes, path: object) -> tuple[dict[str, Any], bytes]:
    """(header, tensor bytes) of a safetensors file; a cut or mangled header is a CorruptFileError."""

    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("cut short")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("bad header")
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({e}); it is cut short or damaged") from None
    return header, data[8 + n:]


def _canonical_header(data: bytes) -> bytes:
    """The same file with its metadata keys sorted: safetensors keeps metadata in a hash map whose order
    changes from process to process, and saeforge's files must be byte-identical across runs."""
    header, body = _split_safetensors(data, "safetensors output")
    if len(header.get("__metadata__") or {}) < 2:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensor data stays 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw + body


def save_safetensors_atomic(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
    checksum: bool = False,
) -> bytes:
    """Write tensors as safetensors atomically; returns the bytes written (for checksums).

    With ``checksum`` the sha256 of the tensor bytes goes into the metadata (``saeforge_sha256``), so
    :func:`load_safetensors_verified` can tell a damaged file from a good one when it reads it back.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = _st_save(tensors, metadata=metadata)
    if checksum:
        _, body = _split_safetensors(data, path)
        data = _canonical_header(_st_save(tensors, metadata={**(metadata or {}), CHECKSUM_KEY: sha256_bytes(body)}))
    write_bytes_atomic(path, data)

    faults.point(f"wrote:{Path(path).name}")
    return data


def load_safetensors_verified(
    path: str | Path, fix: str, require_checksum: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written by :func:`save_safetensors_atomic` and check it: ``(tensors, metadata)``.

    A cut-short or damaged file, or one whose tensor bytes no longer match the checksum in its metadata,
    raises :class:`~saeforge.errors.CorruptFileError` naming the file and ``fix`` (the command that repairs
    it). Files without a checksum (written by an older saeforge or another library) are read unchecked
    unless ``require_checksum``.
    """
    from safetensors.torch import load as _st_load


    path = Path(path)
    data = path.read_bytes()
    header, body = _split_safetensors(data, path)
    meta = header.get("__metadata__") or {}
    want = meta.get(CHECKSUM_KEY)
    if want is None and require_checksum:
        raise CorruptFileError(f"{path} has no checksum, so saeforge did not write it; {fix}")
    if want is not None and sha256_bytes(body) != want:
        raise CorruptFileError(f"{path} fails its checksum (damaged on disk); {fix}")
    try:
        tensors = _st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every malformation
        raise CorruptFileError(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    return tensors, {k: v for k, v in meta.items() if k != CHECKSUM_KEY}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
