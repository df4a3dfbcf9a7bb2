"""Regenerate saeforge/releases.json from SAELens's ``pretrained_saes.yaml`` (the public release names and Hub
paths SAELens users know). Run in an environment with sae-lens installed:

    python scripts/make_releases.py $(python -c "import sae_lens, os; print(os.path.dirname(sae_lens.__file__))")/pretrained_saes.yaml

Releases whose ids equal their paths and number more than ``MAX_LISTED`` are stored as a pattern (the id is
the path); the others list every id -> path. Only releases saeforge has a reader for are kept.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

MAX_LISTED = 40
GEMMA_MODELS = {"gemma-2-2b": "google/gemma-2-2b", "gemma-2-9b": "google/gemma-2-9b",
                "gemma-2-27b": "google/gemma-2-27b"}
GEMMA_SITES = {"res": "resid_post.{layer}", "mlp": "mlp_out.{layer}", "att": "blocks.{layer}.attn.hook_z"}
GEMMA_PATTERN = r"(embedding|layer_\d+)/width_\d+[km]/average_l0_\d+"


def gemma(name: str) -> dict | None:
    m = re.fullmatch(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)(-canonical)?", name)
    if not m:
        return None
    model = GEMMA_MODELS[f"gemma-2-{m.group(1)}"] + ("-it" if m.group(2) == "it" else "")
    return {"format": "gemma_scope", "model": model, "hook": GEMMA_SITES[m.group(3)]}


def gpt2(name: str) -> dict | None:
    if name == "gpt2-small-res-jb" or re.fullmatch(r"gpt2-small-(resid-post|resid-mid|mlp-out|attn-out)-v5-(32k|128k)",
                                                    name):
        return {"format": "saelens", "model": "openai-community/gpt2", "hook": "{id}"}
    return None


LLAMA_SITES = {"r": "resid_post.{layer}", "a": "attn_out.{layer}", "m": "mlp_out.{layer}"}


def llama_scope(name: str) -> dict | None:
    m = re.fullmatch(r"llama_scope_lx([ram])_(8|32)x", name)
    return {"format": "llama_scope", "model": "meta-llama/Llama-3.1-8B", "hook": LLAMA_SITES[m.group(1)]} if m else None


def main(src: str, dst: str = "saeforge/releases.json") -> None:
    data = yaml.safe_load(Path(src).read_text())
    out: dict[str, dict] = {}
    for name in sorted(data):
        info = gemma(name) or gpt2(name) or llama_scope(name)
        if info is None:
            continue
        entry = data[name]
        saes = {s["id"]: s["path"] for s in entry["saes"]}
        rel = {"repo_id": entry["repo_id"], **info}
        if len(saes) > MAX_LISTED and all(k == v for k, v in saes.items()):
            assert all(re.fullmatch(GEMMA_PATTERN, k) for k in saes), name
            rel.update(pattern=GEMMA_PATTERN, example=sorted(saes)[len(saes) // 2])
        else:
            rel["saes"] = saes
        out[name] = rel
    doc = {"about": "Public SAE releases by SAELens name (sae_lens pretrained_saes.yaml): release/sae_id -> Hub "
                    "repo, folder, format. Regenerate with scripts/make_releases.py.",
           "releases": out}
    Path(dst).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"{len(out)} releases -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:])
