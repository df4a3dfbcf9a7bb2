"""Read documents (plain strings) from local files or a Hugging Face data set, one at a time.

Everything downstream (packing, harvesting, live streams) consumes an iterator of strings, so the
readers here never load a whole corpus into memory: text files are read line by line, JSONL line by
line, Parquet in row-group batches, and Hugging Face data sets in streaming mode by default.

Supported sources, decided in this order:

* ``*.txt`` -- documents separated by one or more blank lines (each is stripped; empty ones skipped);
* ``*.jsonl`` / ``*.jsonl.gz`` -- one JSON object per line, the document is ``obj[text_field]``;
* ``*.parquet`` -- column ``text_field``;
* a directory holding such files -- every one of them, in sorted path order (recursively);
* a directory written by ``datasets.Dataset.save_to_disk`` -- loaded with ``datasets.load_from_disk``;
* anything else -- ``datasets.load_dataset(source, split=split, streaming=streaming)`` (a hub name or a
  local data-set folder / script).
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from saeforge.errors import SaeforgeError
from saeforge.paths import looks_local

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in FILE_SUFFIXES:
        if name.endswith(s):
            return s
    return None


def _iter_txt(path: Path) -> Iterator[str]:
    """Blank-line separated paragraphs; a line holding only whitespace counts as blank."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip()
                lines = []
    if lines:
        yield "".join(lines).strip()


def _field(row: dict[str, Any], text_field: str, where: str) -> str | None:
    if text_field not in row:
        raise SaeforgeError(
            f"{where} has no field {text_field!r} (available: {sorted(row)}); pass --text-field with one of them"
        )
    value = row[text_field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise SaeforgeError(
            f"{where}: field {text_field!r} holds {type(value).__name__}, not text; "
            "pass --text-field naming a text column"
        )
    return value


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaeforgeError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise SaeforgeError(
                    f"{path}:{lineno} is a JSON {type(row).__name__}, not an object; write one object per line"
                )
            text = _field(row, text_field, f"{path}:{lineno}")
            if text is not None and text.strip():
                yield text


def _iter_parquet(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise SaeforgeError(
            f"{path} has no column {text_field!r} (available: {sorted(names)}); pass --text-field with one of them"
        )
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file; a file that cannot be read ends as one SaeforgeError naming it."""
    kind = _suffix(path)
    try:
        if kind == ".txt":
            yield from _iter_txt(path)
        elif kind == ".parquet":
            yield from _iter_parquet(path, text_field)
        else:
            yield from _iter_jsonl(path, text_field)
    except SaeforgeError:
        raise
    except UnicodeDecodeError as e:
        raise SaeforgeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8, "
                            "e.g. `iconv -f latin1 -t utf-8`") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SaeforgeError(f"{path} is cut short or not valid gzip ({e}); re-download or recreate it") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own types for damaged parquet files
        if kind == ".parquet" and type(e).__module__.startswith("pyarrow") or isinstance(e, OSError) and kind == ".parquet":
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SaeforgeError(f"{path} is not a readable parquet file ({msg}); re-download or recreate it") from None
        raise


def _iter_rows(rows: Iterable[dict[str, Any]], text_field: str, where: str) -> Iterator[str]:
    for row in rows:
        text = _field(row, text_field, where)
        if text is not None and text.strip():
            yield text


def _iter_hf(source: str, text_field: str, split: str, streaming: bool) -> Iterator[str]:
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise SaeforgeError(f"{source} has no split {split!r} (available: {sorted(ds)}); pass --split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split, streaming=streaming)
    except SaeforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SaeforgeError(
            f"could not load data set {source!r} (split {split!r}): {msg}; pass a .txt/.jsonl/.parquet file, "
            "a folder of them, or a data set name that is reachable"
        ) from None
    yield from _iter_rows(ds, text_field, f"data set {source!r}")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or _suffix(Path(source)) is not None or "\\" in source


def iter_documents(
    source: str, text_field: str = "text", split: str = "train", streaming: bool = True
) -> Iterator[str]:
    """Yield the documents of ``source`` in a fixed order (see the module docstring for the formats).

    The order is deterministic, which the activation cache relies on to resume a harvest by
    re-reading the data and skipping the contexts it already stored.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if _suffix(path) is None:
            raise SaeforgeError(f"{source}: unknown file type; use .txt, .jsonl, .jsonl.gz or .parquet")
        yield from _iter_file(path, text_field)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) is not None)
        if files:
            for f in files:
                yield from _iter_file(f, text_field)
            return
        yield from _iter_hf(str(path), text_field, split, streaming)
        return

    if _looks_like_path(source) or looks_local(source):
        raise SaeforgeError(f"no such file or folder: {source} (the data path does not exist; not tried as a Hugging Face "
                            "data set); "
                            "check the --data path")
    yield from _iter_hf(source, text_field, split, streaming)
