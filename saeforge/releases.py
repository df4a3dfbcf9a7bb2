"""Pretrained SAE releases by the names SAELens users know: ``release/sae_id``.

``saeforge.load_sae("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")`` (and every CLI flag that takes
an SAE) looks ``release`` up in ``saeforge/releases.json`` (generated from SAELens's ``pretrained_saes.yaml`` by
scripts/make_releases.py), maps ``sae_id`` to the release's Hub repo and folder, fetches that folder's files
with ``huggingface_hub.hf_hub_download`` (its cache; ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME`` and
``HF_TOKEN`` apply as everywhere in huggingface_hub) and reads them with the release's format reader. The
release's model and hook fill in what the files do not record (Gemma Scope's ``params.npz`` names neither).
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from saeforge.errors import SaeforgeError

# the files each format's reader needs from a release folder
FILES = {"gemma_scope": ("params.npz",), "saelens": ("cfg.json", "sae_weights.safetensors"),
         "llama_scope": ("checkpoints/final.safetensors", "hyperparams.json")}  # the last file's folder is returned


@dataclass(frozen=True)
class Release:
    """One SAE of a release: where it lives on the Hub and how to read it."""

    release: str
    sae_id: str
    repo_id: str
    path: str  # folder inside the repo
    format: str
    model: str | None
    hook: str | None


@lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Any]]:
    text = resources.files("saeforge").joinpath("releases.json").read_text(encoding="utf-8")
    return json.loads(text)["releases"]


def names() -> list[str]:
    return sorted(registry())


def split(spec: str | Path) -> tuple[str, str] | None:
    """``"release/sae/id"`` -> ("release", "sae/id") when the first part names a known release, else None."""
    if isinstance(spec, Path):
        return None
    head, _, rest = str(spec).strip().strip("/").partition("/")
    return (head, rest) if head in registry() else None


def close_release(spec: str | Path) -> list[str]:
    """Known releases whose names are close to the first part of ``spec`` (for a did-you-mean line)."""
    head = str(spec).strip().strip("/").partition("/")[0]
    return difflib.get_close_matches(head, names(), n=3, cutoff=0.8) if head not in registry() else []


def _layer(sae_id: str) -> str | None:
    m = re.search(r"(?:layer_|blocks\.)(\d+)", sae_id) or re.match(r"l(\d+)[a-z]", sae_id)  # Llama Scope: l15r_8x
    return m.group(1) if m else None


def resolve(release: str, sae_id: str) -> Release:
    """The Hub location of ``release/sae_id``; an unknown release or id is one line naming close matches."""
    rel = registry().get(release)
    if rel is None:
        close = difflib.get_close_matches(release, names(), n=3, cutoff=0.6)
        hint = f"close: {', '.join(close)}" if close else f"known: {', '.join(names()[:4])} ... (saeforge/releases.json)"
        raise SaeforgeError(f"unknown SAE release {release!r} ({hint}); pass RELEASE/SAE_ID, a Hub id or a folder")
    sae_id = sae_id.strip().strip("/")
    listed: dict[str, str] | None = rel.get("saes")
    if listed is not None:
        if sae_id not in listed:
            close = difflib.get_close_matches(sae_id, list(listed), n=3, cutoff=0.5) or sorted(listed)[:3]
            raise SaeforgeError(f"release {release} has no SAE {sae_id!r} (close: {', '.join(close)}); "
                                f"it has {len(listed)} SAEs, listed in saeforge/releases.json")
        path = listed[sae_id]
    else:
        if not re.fullmatch(rel["pattern"], sae_id):
            raise SaeforgeError(f"release {release} has no SAE {sae_id!r}: its ids look like {rel['example']!r}")
        path = sae_id
    layer = _layer(sae_id)
    hook = rel.get("hook")
    if hook and sae_id.startswith("embedding/"):
        hook = "embed"
    elif hook and "{layer}" in hook:
        hook = hook.replace("{layer}", layer) if layer is not None else None
    elif hook:
        hook = hook.replace("{id}", sae_id)
    return Release(release, sae_id, rel["repo_id"], path, rel["format"], rel.get("model"), hook)


def hf_hub_download(**kwargs: Any) -> str:
    """``huggingface_hub.hf_hub_download`` (its cache and environment variables apply)."""
    from huggingface_hub import hf_hub_download as _download

    return _download(**kwargs)


def download(found: Release, revision: str | None = None) -> Path:
    """Fetch (or find in the Hub cache) the release folder's files; return the local folder."""
    local: Path | None = None
    for name in FILES[found.format]:
        try:
            file = hf_hub_download(repo_id=found.repo_id, filename=f"{found.path}/{name}", revision=revision)
        except Exception as err:  # offline without a cached copy, network, auth, missing file: one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SaeforgeError(
                f"could not fetch {found.release}/{found.sae_id} ({found.repo_id}/{found.path}/{name}: {first}); "
                "check your connection, or unset HF_HUB_OFFLINE to download it once into the Hub cache"
            ) from None
        local = Path(file).parent
    assert local is not None
    return local
