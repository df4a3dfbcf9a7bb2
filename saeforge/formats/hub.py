"""Fetch an SAE checkpoint from the Hugging Face Hub with ``huggingface_hub.snapshot_download``.

An id is ``owner/repo`` or ``owner/repo/sub/folder`` (the rest after the repo is a sub-folder, e.g.
``google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105``). Only the sub-folder's files are
downloaded. A string that names an existing local path is always a path, never an id.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from saeforge.errors import SaeforgeError
from saeforge.paths import looks_local

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.\-/]+)?$")


def is_hub_id(text: str | Path) -> bool:
    s = str(text)
    return not Path(s).exists() and not looks_local(text) and bool(_ID.match(s))


def split_id(hub_id: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """``owner/repo/a/b`` -> (``owner/repo``, ``a/b``), joined with an explicit ``subfolder``."""
    parts = hub_id.strip("/").split("/")
    repo, rest = "/".join(parts[:2]), "/".join(parts[2:])
    sub = "/".join(p for p in (rest, (subfolder or "").strip("/")) if p) or None
    return repo, sub


def snapshot_download(**kwargs: Any) -> str:
    """``huggingface_hub.snapshot_download`` (a seam tests replace with a local folder)."""
    from huggingface_hub import snapshot_download as _download

    return _download(**kwargs)


def download(hub_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """Download (or reuse the cached copy of) the files of ``hub_id`` under ``subfolder``; return that folder."""
    repo, sub = split_id(hub_id, subfolder)
    patterns = [f"{sub}/*"] if sub else None
    try:
        local = snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)
    except Exception as err:  # network, auth, missing repo: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SaeforgeError(f"could not download {repo} from the Hugging Face Hub ({first}); check the id and "
                            "your connection, or pass a local folder") from None
    folder = Path(local) / sub if sub else Path(local)
    if not folder.exists():
        raise SaeforgeError(f"{repo} has no folder {sub!r} at revision {revision or 'main'}; check --subfolder")
    return folder
