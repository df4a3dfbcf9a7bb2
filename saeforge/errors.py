"""One exception type for user mistakes, and the one place that turns any error a user can cause into a line.

The CLI prints a :class:`SaeforgeError` as a single line and exits 2. :func:`describe` does the same for the
OS and library errors that bad input or a bad environment raise (disk full, read-only folder, a file cut
short or not UTF-8, an allocation that cannot fit): it names the problem and the fix, and returns None for
anything else (a bug, which the CLI reports as an internal error).
"""
from __future__ import annotations

import errno


class SaeforgeError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class NonFiniteError(SaeforgeError):
    """A NaN or an infinity reached a place that must hold finite numbers."""


class CorruptFileError(SaeforgeError):
    """A file saeforge wrote no longer matches its checksum, or is cut short."""


def corrupt(path: object, why: str, fix: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is corrupt ({why}); {fix}")


_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free space or write to another disk, then rerun (with --resume where supported)",
    errno.EDQUOT: "the disk quota is used up; free space or write elsewhere, then rerun",
    errno.EROFS: "the file system is read-only; pick a writable --out",
    errno.EACCES: "permission denied; pick a path you may read/write, or fix its permissions",
    errno.EPERM: "operation not permitted; pick a path you may read/write",
    errno.EFBIG: "the file would exceed the size limit (ulimit -f); raise the limit or write smaller shards",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder where a file was expected; check the path",
    errno.ENAMETOOLONG: "the path is too long; use a shorter one",
    errno.EMFILE: "too many open files; raise `ulimit -n`",
    errno.ENOMEM: "out of memory; use smaller batches/widths or a machine with more memory",
    errno.EIO: "an input/output error from the device; check the disk",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str | None:
    """One line naming the problem and the fix for a user-causable error, else None."""
    if isinstance(exc, SaeforgeError):
        return _first_line(exc)
    if isinstance(exc, UnicodeDecodeError):
        return (f"input is not UTF-8 text ({exc.reason} at byte {exc.start}); convert the file to UTF-8 "
                "(e.g. `iconv -f latin1 -t utf-8`)")
    if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or _first_line(exc)}{where}: {_OS_FIXES[exc.errno]}"
    if isinstance(exc, EOFError) or type(exc).__name__ == "BadGzipFile":
        return f"a compressed input is cut short or damaged ({_first_line(exc)}); re-download or recreate it"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("can't allocate memory", "out of memory",
                                                                       "not enough memory"))
    ):
        return ("an allocation did not fit in memory; lower --batch-size / --width / --shuffle-buffer "
                "or use a device with more memory")
    if type(exc).__name__ == "SafetensorError":
        return (f"a .safetensors file is unreadable ({_first_line(exc)}); it is cut short or not a "
                "safetensors file: recreate it (rerun the command that wrote it)")
    if type(exc).__module__.startswith("pyarrow") and "Arrow" in type(exc).__name__:
        return f"a parquet input is unreadable ({_first_line(exc)}); re-download or recreate it"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or _first_line(exc)}{where}; check the path, the disk and the permissions"
    return None
