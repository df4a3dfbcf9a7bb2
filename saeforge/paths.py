"""Local paths vs. Hugging Face Hub ids: a string that looks like a local path is never sent to the Hub.

A spec *looks local* when it starts with ``./``, ``../``, ``/``, ``~`` (or ``.``), has a file extension saeforge
reads (``.bin``, ``.safetensors``, ``.txt``, ``.jsonl``, ``.parquet`` ...), or its parent folder exists here
(``runs/topk`` beside an existing ``runs/``). Such a spec that does not exist fails at once with one line
("no such file or folder: PATH") instead of a slow, confusing hub lookup.
"""
from __future__ import annotations

from pathlib import Path

from saeforge.errors import SaeforgeError

LOCAL_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".json", ".jsonl", ".gz",
                  ".txt", ".parquet", ".arrow", ".csv", ".model", ".gguf")


def looks_local(spec: str | Path) -> bool:
    """True when ``spec`` reads as a path on this machine rather than a hub id (see the module docstring)."""
    if isinstance(spec, Path):
        return True
    s = str(spec).strip()
    if not s:
        return False
    if s.startswith((".", "/", "~")) or "\\" in s:
        return True
    if s.lower().endswith(LOCAL_SUFFIXES):
        return True
    parent = Path(s).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def normalise_model_spec(spec: str | Path | None) -> str | None:
    """A model spec in one form for comparison: ``llama2c:`` dropped, a local path made absolute and resolved,
    a hub id as written (without a trailing ``/``)."""
    if spec is None or str(spec).strip() == "":
        return None
    s = str(spec).strip()
    if s.startswith("llama2c:"):
        s = s[len("llama2c:"):]
    p = Path(s).expanduser()
    if p.exists():
        return str(p.resolve())
    return s.rstrip("/")


def model_mismatch(saes: dict[str, str | None], used: str | Path | None, command: str, fix: str) -> str | None:
    """One warning line when a model other than the one the SAEs name is used, else None.

    ``saes`` maps SAE name -> its ``cfg.model``; SAEs that name no model are not compared. ``fix`` names the
    flags that override (e.g. ``--model``, ``--model/--hook``).
    """
    want = normalise_model_spec(used)
    if want is None:
        return None
    other = {n: m for n, m in saes.items() if m and normalise_model_spec(m) != want}
    if not other:
        return None
    names = sorted(n for n in other if n)
    shown = (" " + ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")) if names else ""
    models = sorted({str(m) for m in other.values()})
    return (f"saeforge {command}: warning: SAE{shown} names model {' / '.join(models)} but runs on {used}; "
            f"its numbers describe activations it was not trained on (to use the SAE's own model pass --model "
            f"{models[0]}; to run it here on purpose, keep {fix})")


def warn_model_mismatch(saes: dict[str, str | None], used: str | Path | None, command: str, fix: str) -> None:
    import sys

    line = model_mismatch(saes, used, command, fix)
    if line:
        print(line, file=sys.stderr)


class NoSuchPathError(SaeforgeError, FileNotFoundError):
    """A local path that does not exist (a SaeforgeError: the CLI prints its one line)."""


def require_exists(spec: str | Path, what: str = "", flag: str = "") -> None:
    """Raise :class:`NoSuchPathError` when ``spec`` looks local and does not exist; else do nothing."""
    if looks_local(spec) and not Path(str(spec)).expanduser().exists():
        name = f"{what} " if what else ""
        fix = f"check the {flag} path" if flag else "check the path"
        raise NoSuchPathError(f"no such file or folder: {spec} (the {name}path does not exist; not tried as a "
                              f"Hugging Face Hub id); {fix}")
