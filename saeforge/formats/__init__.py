"""Read and write the SAE checkpoint formats researchers already have.

``load_sae(path_or_hub_id)`` detects the format from the files and returns a saeforge :class:`SAE` whose
``encode``/``decode``/``forward`` reproduce the peer library's outputs; ``save_sae_as(sae, path, to)`` writes
one in a peer's layout (key names, orientations, dtypes, config keys). The conventions each format hides are
tabulated in docs/formats.md; every reader and writer is checked against checkpoints written by the real
libraries (``../shared/fixtures``).

Formats: ``saeforge`` (native), ``saelens``, ``sparsify``, ``dictionary_learning``, ``gemma_scope``,
``openai``.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from saeforge import releases
from saeforge.errors import SaeforgeError
from saeforge.hooknames import to_saeforge
from saeforge.paths import looks_local
from saeforge.formats import dictionary_learning, gemma_scope, hub, llama_scope, openai, saelens, sparsify
from saeforge.formats.common import (
    DICTIONARY_LEARNING,
    GEMMA_SCOPE,
    OPENAI,
    SAEFORGE,
    SAELENS,
    SPARSIFY,
    read_json,
)
from saeforge.sae import SAE
from saeforge.sae.base import check_finite_weights
from saeforge.paths import require_exists

MODULES: dict[str, ModuleType] = {
    SAELENS: saelens,
    SPARSIFY: sparsify,
    DICTIONARY_LEARNING: dictionary_learning,
    GEMMA_SCOPE: gemma_scope,
    OPENAI: openai,
    llama_scope.LLAMA_SCOPE: llama_scope,
}
FORMATS = (SAEFORGE, *MODULES)
_ALIASES = {"sae_lens": SAELENS, "native": SAEFORGE, "dictlearn": DICTIONARY_LEARNING, "gemmascope": GEMMA_SCOPE,
            "dl": DICTIONARY_LEARNING, "llamascope": llama_scope.LLAMA_SCOPE}


def canonical_format(name: str) -> str:
    """'sae-lens' / 'SAE_Lens' -> 'saelens'; unknown names are an error listing the known ones."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise SaeforgeError(f"unknown SAE format {name!r}; choose one of {', '.join(FORMATS)}")
    return key


def _is_native(path: Path) -> bool:
    if not (path.is_dir() and (path / "cfg.json").exists() and (path / "sae.safetensors").exists()):
        return False
    try:
        return "arch" in read_json(path / "cfg.json")
    except SaeforgeError as e:
        if "not valid JSON" in str(e):  # saeforge's and sparsify's layout: a damaged cfg.json, not another format
            raise
        return False


def detect_format(path: str | Path) -> str:
    """The format of a local checkpoint folder or file, from its file names (and ``cfg.json`` keys)."""
    path = Path(path)
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist; pass a checkpoint folder or file (or a Hub id to load_sae)")
    if path.is_file():
        if path.suffix == ".npz":
            return GEMMA_SCOPE
        if path.name == "ae.pt":
            return DICTIONARY_LEARNING
        if path.suffix == ".pt":
            return OPENAI
        path = path.parent  # cfg.json / *.safetensors: the folder is the checkpoint
    if _is_native(path):
        return SAEFORGE
    for name in (SAELENS, SPARSIFY, DICTIONARY_LEARNING, GEMMA_SCOPE, OPENAI, llama_scope.LLAMA_SCOPE):
        if MODULES[name].detect(path):
            return name
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "empty"
    raise SaeforgeError(f"cannot tell the SAE format of {path} (contents: {listing}); pass format= (--from) "
                        f"explicitly, one of {', '.join(FORMATS)}")


def _local_path(src: str | Path, subfolder: str | None, revision: str | None) -> Path:
    require_exists(src, "SAE", "--sae")
    if hub.is_hub_id(src):
        return hub.download(str(src), subfolder=subfolder, revision=revision)
    path = Path(src).expanduser()
    if not path.exists():
        raise SaeforgeError(f"{path} does not exist (and is not a Hugging Face Hub id owner/repo[/folder])")
    if subfolder:
        path = path / subfolder
        if not path.exists():
            raise SaeforgeError(f"{path} does not exist; check subfolder={subfolder!r}")
    return path


def load_sae(
    path_or_hub_id: str | Path,
    format: str | None = None,  # noqa: A002  (the natural name for users)
    device: str | torch.device = "cpu",
    *,
    hookpoint: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    normalize_decoder: bool = False,
    embedding: bool | None = None,
) -> SAE:
    """Load any supported checkpoint as a saeforge SAE.

    ``hookpoint`` picks one coder of a sparsify run folder; ``subfolder``/``revision`` address a folder inside
    a local path or a Hub repo; ``normalize_decoder`` reproduces dictionary_learning's ``load_dictionary``
    (unit decoder columns for ``AutoEncoder``); ``embedding`` overrides whether a Gemma Scope file is an
    embedding SAE (default: its folder name says so, as in sae_lens; docs/formats.md). The source format,
    library and version are recorded in ``sae.cfg.metadata``.
    """
    found = _release(path_or_hub_id, subfolder)
    if found is not None:
        path = releases.download(found, revision)
        format = format or found.format  # noqa: A001
    else:
        path = _local_path(path_or_hub_id, subfolder, revision)
    fmt = canonical_format(format) if format else detect_format(path)
    if normalize_decoder and fmt != DICTIONARY_LEARNING:
        raise SaeforgeError(f"normalize_decoder applies to dictionary_learning checkpoints only (this is {fmt})")
    if path.is_file() and fmt not in (GEMMA_SCOPE, OPENAI):
        path = path.parent  # e.g. .../cfg.json or .../ae.pt: the folder is the checkpoint
    if embedding is not None and fmt != GEMMA_SCOPE:
        raise SaeforgeError(f"embedding= applies to Gemma Scope checkpoints only (this is {fmt})")
    if hookpoint is not None and fmt != SPARSIFY:
        raise SaeforgeError(f"hookpoint= selects a sparsify run's coder; this checkpoint is {fmt} (use subfolder=)")
    if fmt == SAEFORGE:
        sae = SAE.load(path, device=device)
    else:
        try:
            sae = MODULES[fmt].load(path, device=device, hookpoint=hookpoint, normalize_decoder=normalize_decoder,
                                    **({} if embedding is None else {"embedding": embedding}))
        except KeyError as e:
            raise SaeforgeError(f"{path}: this {fmt} checkpoint lacks {e}; it is incomplete or not {fmt} "
                                "(pass --from with the right format, or re-download it)") from None
        except RuntimeError as e:
            if "size mismatch" not in str(e) and "shape" not in str(e):
                raise
            raise SaeforgeError(f"{path}: the {fmt} tensors do not fit its config ({str(e).splitlines()[0]}); "
                                "the checkpoint is inconsistent: re-download or re-export it") from None
        check_finite_weights(sae.state_dict(), path)
    if found is not None:
        sae.cfg.metadata["source_release"] = {"release": found.release, "sae_id": found.sae_id,
                                              "repo_id": found.repo_id, "path": found.path, "revision": revision}
        if sae.cfg.hook is None and found.hook:  # Gemma Scope files name no hook or model; the release does
            sae.cfg.hook = to_saeforge(found.hook)
        if sae.cfg.model is None and found.model:
            sae.cfg.model = found.model
    elif hub.is_hub_id(path_or_hub_id):
        sae.cfg.metadata["source_hub"] = {"id": str(path_or_hub_id), "subfolder": subfolder, "revision": revision}
    return sae


def _release(src: str | Path, subfolder: str | None) -> releases.Release | None:
    """``release/sae_id`` (saeforge/releases.py) when ``src`` is not a local path; a near-miss of a release name
    is an error naming it rather than a confusing Hub lookup."""
    if isinstance(src, Path) or Path(str(src)).expanduser().exists() or looks_local(src):
        return None
    parts = releases.split(src)
    if parts is None:
        close = releases.close_release(src)
        if close:
            raise SaeforgeError(f"unknown SAE release {str(src).partition('/')[0]!r} (close: {', '.join(close)}); "
                                "pass RELEASE/SAE_ID, a Hub id or a folder")
        return None
    if subfolder:
        raise SaeforgeError(f"subfolder= does not apply to the release id {src}; the SAE id names the folder")
    return releases.resolve(*parts)


def save_sae_as(sae: SAE, path: str | Path, to: str, **options: Any) -> Path:
    """Write ``sae`` in format ``to``; returns the written folder (or file for gemma_scope / openai).

    Folding (decoder norms, dataset-level scales, the ``b_dec``-subtraction convention) happens here when the
    target needs it; an architecture or feature the target cannot hold is a :class:`SaeforgeError` naming both.
    Options: ``hookpoint`` (sparsify: write a run folder ``path/<hookpoint>/`` with ``config.json``).
    """
    fmt = canonical_format(to)
    path = Path(path)
    takes = {SPARSIFY: {"hookpoint"}, GEMMA_SCOPE: {"embedding"}}.get(fmt, set())
    unknown = sorted(set(options) - takes)
    if unknown:
        raise SaeforgeError(f"option(s) {unknown} do not apply to format {fmt}")
    if fmt == SAEFORGE:
        return sae.save(path, fold=False)  # conversions keep code values; see export_tensors
    return MODULES[fmt].save(sae, path, **options)


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    from_format: str | None = None,
    hookpoint: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    normalize_decoder: bool = False,
    out_hookpoint: str | None = None,
) -> tuple[SAE, Path]:
    """``load_sae(src)`` then ``save_sae_as(..., dst, to)``; returns the SAE and the written path."""
    sae = load_sae(src, from_format, hookpoint=hookpoint, subfolder=subfolder, revision=revision,
                   normalize_decoder=normalize_decoder)
    options = {"hookpoint": out_hookpoint} if out_hookpoint else {}
    return sae, save_sae_as(sae, dst, to, **options)


__all__ = ["FORMATS", "canonical_format", "convert", "detect_format", "load_sae", "save_sae_as"]
