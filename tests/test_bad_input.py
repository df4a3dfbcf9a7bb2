"""Nothing silent: every corrupt, non-finite or nonsensical input is refused with one line.

One table of bad inputs across every command (in-process ``saeforge.cli.main``), one for the Python API, and a
few real subprocesses to show that no traceback reaches the terminal. Each CLI case asserts the exit code, that
stderr holds exactly one ``saeforge ...: error: ...`` line (no traceback) and a substring of the message.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from saeforge.cli import main

REPO = Path(__file__).resolve().parents[1]
HOOK = "resid_post.2"


# ------------------------------------------------------------------------------------------------ the world
@dataclass
class World:
    root: Path
    model: Path
    train_txt: Path
    valid_txt: Path

    def __getattr__(self, name: str) -> Path:  # w.cache -> root/cache; w.bad_txt -> root/bad.txt
        root = self.__dict__["root"]
        if not (root / name).exists() and "_" in name:
            stem, ext = name.rsplit("_", 1)
            if (root / f"{stem}.{ext}").exists():
                return root / f"{stem}.{ext}"
        return root / name


def _flip(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _stub(path: Path) -> None:
    """Cut inside the header: what a crash of a non-atomic writer (or a full disk) leaves."""
    path.write_bytes(path.read_bytes()[:40])


def _without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _harvest_argv(w: World, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["harvest", "--model", str(w.model), "--data", str(data or w.train_txt), "--hooks", HOOK, "--out", str(out),
            "--context-len", "32", "--batch-contexts", "8", "--shard-tokens", "512", "--max-tokens", "1500",
            "--quiet", *extra]


def _train_argv(w: World, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["train", "--data", str(data or w.cache), "--width", "128", "--k", "8", "--tokens", "2048",
            "--batch-size", "256", "--shuffle-buffer", "1024", "--checkpoint-every", "4", "--log-every", "2",
            "--device", "cpu", "--dtype", "float32", "--no-progress", "--out", str(out), *extra]


def _eval_argv(w: World, sae: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["eval", "--sae", str(sae), "--data", str(w.valid_txt), "--tokens", "96", "--context-len", "32",
            "--no-downstream", "--no-progress", "--device", "cpu", "--out", str(out or w.root / "eval_x"), *extra]


def _adapt_argv(w: World, out: Path, *extra: str) -> list[str]:
    return ["adapt", "train", "--sae", str(w.sae), "--data", str(w.valid_txt), "--tokens", "256", "--context-len", "32",
            "--batch-contexts", "2", "--eval-tokens", "200", "--checkpoint-every", "2", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def _dash_argv(w: World, out: Path, *extra: str, sae: Path | None = None) -> list[str]:
    return ["dashboard", "build", str(sae or w.sae), "--data", str(w.cache), "--out", str(out), "--top-k", "3",
            "--bands", "2", "--per-band", "2", "--logits", "3", "--neighbors", "3", "--checkpoint-rows", "500",
            "--no-progress", *extra]


def _save_sae_with(src: Path, dst: Path, change: Callable[[Any], None]) -> Path:
    from saeforge.sae import SAE

    sae = SAE.load(src)
    change(sae)
    sae.save(dst)
    return dst


def _nan_weights(sae: Any) -> None:
    with torch.no_grad():
        sae.W_dec[3, 5] = float("nan")


@pytest.fixture(scope="module")
def w(tmp_path_factory, stories_model_path, tinystories_train, tinystories_valid) -> World:
    import gzip as _gz

    import pyarrow as pa
    import pyarrow.parquet as pq

    from saeforge.sae import create_sae, make_config

    root = tmp_path_factory.mktemp("bad")
    world = World(root, stories_model_path, tinystories_train, tinystories_valid)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(_harvest_argv(world, root / "cache")) == 0
        assert main(_train_argv(world, root / "sae")) == 0
    # text inputs
    (root / "bad.txt").write_bytes(b"Once upon a time \xff\xfe there was a cat.\n\nThe end.\n")
    (root / "empty.txt").write_text("")
    (root / "data.xyz").write_text("hello")
    (root / "nofield.jsonl").write_text('{"body": "hello there"}\n')
    gz = _gz.compress(b'{"text": "Once upon a time there was a dog."}\n' * 200)
    (root / "trunc.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    pq.write_table(pa.table({"text": ["Once upon a time."] * 500}), root / "good.parquet")
    (root / "trunc.parquet").write_bytes((root / "good.parquet").read_bytes()[:300])
    (root / "garbage.bin").write_bytes(os.urandom(2000))
    (root / "afile").write_text("not a folder")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    # damaged caches
    _flip(_copy(root / "cache", root / "cache_flip") / "shard_00001.safetensors")
    _truncate(_copy(root / "cache", root / "cache_trunc") / "shard_00000.safetensors")
    (_copy(root / "cache", root / "cache_badjson") / "manifest.json").write_text("{ not json")
    m = json.loads((root / "cache" / "manifest.json").read_text())
    (_copy(root / "cache", root / "cache_incomplete") / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    _nan_cache(_copy(root / "cache", root / "cache_nan"))
    # damaged SAEs
    _flip(_copy(root / "sae", root / "sae_flip") / "sae.safetensors")
    _truncate(_copy(root / "sae", root / "sae_trunc") / "sae.safetensors")
    _stub(_copy(root / "sae", root / "sae_stub") / "sae.safetensors")
    (_copy(root / "sae", root / "sae_badcfg") / "cfg.json").write_text("{ nope")
    cfg = json.loads((root / "sae" / "cfg.json").read_text())
    (_copy(root / "sae", root / "sae_shape") / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 256}))
    (_copy(root / "sae", root / "sae_nomodel") / "cfg.json").write_text(json.dumps({**cfg, "model": None}))
    _save_sae_with(root / "sae", root / "sae_nan", _nan_weights)
    narrow = create_sae(make_config("relu", d_in=32, d_sae=64, hook=HOOK, model=str(stories_model_path)))
    narrow.save(root / "sae_narrow")
    # damaged checkpoints
    _flip(_copy(root / "sae", root / "run_flip") / "checkpoint.safetensors")
    _truncate(_copy(root / "sae", root / "run_trunc") / "checkpoint.safetensors")
    _stub(_copy(root / "sae", root / "run_stub") / "checkpoint.safetensors")
    _nan_checkpoint(_copy(root / "sae", root / "run_nan") / "checkpoint.safetensors")
    return world


def _nan_cache(folder: Path) -> None:
    """A cache whose shard 1 holds NaN rows but whose manifest checksum matches (as if harvested so)."""
    from safetensors.torch import load_file

    from saeforge.io import save_safetensors_atomic, sha256_bytes

    f = folder / "shard_00001.safetensors"
    t = load_file(str(f))
    t[f"acts.{HOOK}"][:10] = float("nan")
    data = save_safetensors_atomic(f, t)
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_bytes(data)
    (folder / "manifest.json").write_text(json.dumps(m))


def _nan_checkpoint(path: Path) -> None:
    from safetensors import safe_open

    from saeforge.io import save_safetensors_atomic

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.pop("saeforge_sha256")
    tensors["/model.W_dec"][0, 0] = float("nan")
    save_safetensors_atomic(path, tensors, metadata=meta, checksum=True)


@pytest.fixture(scope="module")
def adapt_run(w) -> Path:
    out = w.root / "adapt"
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(_adapt_argv(w, out)) == 0
    return out


@pytest.fixture(scope="module")
def eval_run(w) -> Path:
    out = w.root / "evaluated"
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(_eval_argv(w, w.sae, out=out)) == 0
    return out


@pytest.fixture(scope="module")
def dash_run(w) -> Path:
    out = w.root / "dash"
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(_dash_argv(w, out)) == 0
    return out


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _held(folder: Path, command: str = "other"):
    from saeforge.lock import folder_lock

    # flock locks belong to the open file, so a second open in this process conflicts like another process
    with folder_lock(folder, command):
        yield


@contextlib.contextmanager
def _os_error(err: int, where: str = "saeforge.io.os.replace"):
    def boom(*a, **k):
        raise OSError(err, os.strerror(err), str(a[-1]) if a else None)

    mp = pytest.MonkeyPatch()
    mp.setattr(where, boom)
    try:
        yield
    finally:
        mp.undo()


def _error_line(capsys, argv: list[str], ctx=None) -> tuple[int, str]:
    capsys.readouterr()
    with ctx or contextlib.nullcontext():
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines()
             if ln.strip() and not ln.startswith("Loading weights") and "warn" not in ln.lower()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("saeforge") and ": error: " in lines[0], lines[0]
    return rc, lines[0]


# ------------------------------------------------------------------------------------------------ the CLI table
# (id, argv builder (w, tmp) -> argv or (argv, context manager), expected substring); exit code 2 unless given
A = Callable[[World, Path], Any]
CASES: list[tuple[str, A, str] | tuple[str, A, str, int]] = [
    # ---- harvest: flags
    ("harvest-context-len-0", lambda w, t: _harvest_argv(w, t / "o", "--context-len", "0"), "context_len must be positive"),
    ("harvest-context-len-beyond-model", lambda w, t: _harvest_argv(w, t / "o", "--context-len", "100000"),
     "exceeds the 512 positions"),
    ("harvest-batch-contexts-0", lambda w, t: _harvest_argv(w, t / "o", "--batch-contexts", "0"), "batch_contexts must be positive"),
    ("harvest-shard-tokens-negative", lambda w, t: _harvest_argv(w, t / "o", "--shard-tokens", "-5"), "'-5' is not a positive whole count"),
    ("harvest-max-tokens-0", lambda w, t: _harvest_argv(w, t / "o", "--max-tokens", "0"), "'0' is not a positive whole count"),
    ("harvest-max-tokens-word", lambda w, t: _harvest_argv(w, t / "o", "--max-tokens", "lots"), "cannot read 'lots' as a count"),
    ("harvest-context-len-float", lambda w, t: _harvest_argv(w, t / "o", "--context-len", "3.5"), "invalid int value"),
    ("harvest-dtype", lambda w, t: _harvest_argv(w, t / "o", "--dtype", "int8"), "invalid choice: 'int8'"),
    ("harvest-on-nonfinite", lambda w, t: _harvest_argv(w, t / "o", "--on-nonfinite", "ignore"), "invalid choice: 'ignore'"),
    ("harvest-no-hooks", lambda w, t: [a if a != HOOK else "," for a in _harvest_argv(w, t / "o")], "no hooks given"),
    ("harvest-hook-out-of-range", lambda w, t: [a if a != HOOK else "resid_post.99" for a in _harvest_argv(w, t / "o")],
     "out of range"),
    ("harvest-hook-twice", lambda w, t: _harvest_argv(w, t / "o", "--hooks", HOOK), "repeats a name"),
    ("harvest-device-cuda", lambda w, t: _harvest_argv(w, t / "o", "--device", "cuda"), "CUDA is not available"),
    # ---- harvest: data
    ("harvest-data-missing", lambda w, t: _harvest_argv(w, t / "o", data=t / "missing.txt"), "does not exist"),
    ("harvest-data-not-utf8", lambda w, t: _harvest_argv(w, t / "o", data=w.bad_txt), "is not UTF-8 text"),
    ("harvest-data-truncated-gzip", lambda w, t: _harvest_argv(w, t / "o", data=w.root / "trunc.jsonl.gz"), "cut short"),
    ("harvest-data-truncated-parquet", lambda w, t: _harvest_argv(w, t / "o", data=w.root / "trunc.parquet"),
     "not a readable parquet file"),
    ("harvest-data-unknown-type", lambda w, t: _harvest_argv(w, t / "o", data=w.root / "data.xyz"), "unknown file type"),
    ("harvest-data-empty", lambda w, t: _harvest_argv(w, t / "o", data=w.empty_txt), "gave no context"),
    ("harvest-data-no-text-field", lambda w, t: _harvest_argv(w, t / "o", data=w.nofield_jsonl), "no field 'text'"),
    # ---- harvest: model
    ("harvest-model-missing", lambda w, t: [a if a != str(w.model) else str(t / "none.bin") for a in _harvest_argv(w, t / "o")],
     "no such file or folder"),
    ("harvest-model-garbage", lambda w, t: [a if a != str(w.model) else str(w.garbage_bin) for a in _harvest_argv(w, t / "o")],
     "not a llama2.c checkpoint"),
    # ---- harvest: output folder
    ("harvest-out-is-file", lambda w, t: _harvest_argv(w, w.afile), "is a file"),
    ("harvest-out-foreign-folder", lambda w, t: _harvest_argv(w, w.foreign), "not empty and not an activation cache"),
    ("harvest-out-other-config", lambda w, t: _harvest_argv(w, w.cache, "--context-len", "64"), "context_len: 32 -> 64"),
    ("harvest-out-locked", lambda w, t: (_harvest_argv(w, t / "o"), _held(t / "o", "harvest")),
     "being written by another saeforge process"),
    ("harvest-disk-full", lambda w, t: (_harvest_argv(w, t / "o"), _os_error(errno.ENOSPC)), "the disk is full"),
    ("harvest-read-only", lambda w, t: (_harvest_argv(w, t / "o"), _os_error(errno.EROFS)), "read-only"),
    ("harvest-permission", lambda w, t: (_harvest_argv(w, t / "o"), _os_error(errno.EACCES)), "permission denied"),
    # ---- train: flags (refused before any data is read)
    ("train-width-0", lambda w, t: _train_argv(w, t / "o", "--width", "0"), "argument --width: '0' is not a positive whole count"),
    ("train-width-negative", lambda w, t: _train_argv(w, t / "o", "--width", "-3"), "argument --width: '-3' is not a positive whole count"),
    ("train-expansion-0", lambda w, t: _train_argv(w, t / "o", "--expansion", "0"), "--expansion 0"),
    ("train-k-0", lambda w, t: _train_argv(w, t / "o", "--k", "0"), "--k 0 must be a positive"),
    ("train-k-above-width", lambda w, t: _train_argv(w, t / "o", "--k", "500"), "k=500 must be between 1 and d_sae=128"),
    ("train-tokens-negative", lambda w, t: _train_argv(w, t / "o", "--tokens", "-1"), "not a positive whole count"),
    ("train-tokens-0", lambda w, t: _train_argv(w, t / "o", "--tokens", "0"), "not a positive whole count"),
    ("train-tokens-5Q", lambda w, t: _train_argv(w, t / "o", "--tokens", "5Q"), "cannot read '5Q' as a count"),
    ("train-optimizer-unknown", lambda w, t: _train_argv(w, t / "o", "--optimizer", "sgd"), "--optimizer: invalid choice"),
    ("train-momentum-1", lambda w, t: _train_argv(w, t / "o", "--momentum", "1"), "momentum must be a number in (0, 1)"),
    ("train-momentum-nan", lambda w, t: _train_argv(w, t / "o", "--momentum", "nan"), "--momentum: 'nan' is not a finite number"),
    ("train-average-power-negative", lambda w, t: _train_argv(w, t / "o", "--average-power", "-1"),
     "average_power must be a finite number >= 0"),
    ("train-decay-frac-2", lambda w, t: _train_argv(w, t / "o", "--decay-frac", "2"), "decay_frac must be"),
    ("train-tokens-inf", lambda w, t: _train_argv(w, t / "o", "--tokens", "1e999"), "not a positive whole count"),
    ("train-checkpoint-every-negative", lambda w, t: _train_argv(w, t / "o", "--checkpoint-every", "-1"),
     "checkpoint_every must be >= 0"),
    ("train-log-every-0", lambda w, t: _train_argv(w, t / "o", "--log-every", "0"), "log_every must be >= 1"),
    ("train-batch-size-0", lambda w, t: _train_argv(w, t / "o", "--batch-size", "0"), "argument --batch-size: '0' is not a positive whole count"),
    ("train-lr-nan", lambda w, t: _train_argv(w, t / "o", "--lr", "nan"), "'nan' is not a finite number"),
    ("train-lr-inf", lambda w, t: _train_argv(w, t / "o", "--lr", "inf"), "'inf' is not a finite number"),
    ("train-lr-negative", lambda w, t: _train_argv(w, t / "o", "--lr=-1e-3"), "lr must be a finite number > 0"),
    ("train-lr-word", lambda w, t: _train_argv(w, t / "o", "--lr", "fast"), "cannot read 'fast' as a number"),
    ("train-decay-frac-2", lambda w, t: _train_argv(w, t / "o", "--decay-frac", "2"), "decay_frac must be"),
    ("train-grad-clip-negative", lambda w, t: _train_argv(w, t / "o", "--grad-clip", "-1"), "grad_clip must be"),
    ("train-warmup-negative", lambda w, t: _train_argv(w, t / "o", "--warmup-steps", "-2"), "warmup_steps must be >= 0"),
    ("train-dead-tokens-0", lambda w, t: _train_argv(w, t / "o", "--dead-tokens", "0"), "not a positive whole count"),
    ("train-set-k-abc", lambda w, t: _train_argv(w, t / "o", "--set", "aux_coef=abc"), "aux_coef must be a number"),
    ("train-set-int-abc", lambda w, t: _train_argv(w, t / "o", "--set", "k_aux=abc"), "k_aux must be an integer"),
    ("train-set-nan", lambda w, t: _train_argv(w, t / "o", "--set", "aux_coef=NaN"), "must be a finite number"),
    ("train-set-aux-negative", lambda w, t: _train_argv(w, t / "o", "--set", "aux_coef=-1"),
     "aux_coef must be a finite number >= 0"),
    ("train-set-unknown", lambda w, t: _train_argv(w, t / "o", "--set", "bogus=1"), "unknown key(s) ['bogus']"),
    ("train-set-no-equals", lambda w, t: _train_argv(w, t / "o", "--set", "k"), "needs the form key=value"),
    ("train-arch-unknown", lambda w, t: _train_argv(w, t / "o", "--arch", "nope"), "unknown SAE architecture 'nope'"),
    ("train-recipe-unknown", lambda w, t: _without(_train_argv(w, t / "o", "--arch", "jumprelu", "--recipe", "nope"), "--k"),
     "recipe 'nope' is not known"),
    ("train-dtype-unknown", lambda w, t: _train_argv(w, t / "o", "--dtype", "int8"), "dtype must be auto"),
    ("train-kernels-unknown", lambda w, t: _train_argv(w, t / "o", "--kernels", "fast"), "invalid choice: 'fast'"),
    ("train-width-huge", lambda w, t: _train_argv(w, t / "o", "--width", str(10**13), "--k", "8"),
     "did not fit in memory"),
    # ---- train: data
    ("train-data-not-cache", lambda w, t: _train_argv(w, t / "o", data=w.foreign), "not an activation cache; pass --model"),
    ("train-cache-incomplete", lambda w, t: _train_argv(w, t / "o", data=w.cache_incomplete), "is incomplete"),
    ("train-cache-flipped-shard", lambda w, t: _train_argv(w, t / "o", data=w.cache_flip),
     "shard_00001.safetensors fails its checksum"),
    ("train-cache-truncated-shard", lambda w, t: _train_argv(w, t / "o", data=w.cache_trunc),
     "shard_00000.safetensors fails its checksum"),
    ("train-cache-bad-manifest", lambda w, t: _train_argv(w, t / "o", data=w.cache_badjson), "manifest.json is not valid JSON"),
    ("train-cache-nan-rows", lambda w, t: _train_argv(w, t / "o", data=w.cache_nan), "holds NaN/Inf activations"),
    ("train-hook-not-in-cache", lambda w, t: _train_argv(w, t / "o", "--hook", "resid_post.1"), "are not in cache"),
    ("train-text-context-beyond-model", lambda w, t: _train_argv(w, t / "o", "--model", str(w.model), "--hook", HOOK,
                                                                 "--context-len", "4096", data=w.train_txt),
     "exceeds the 512 positions"),
    # ---- train: output folder and resume
    ("train-existing-run-no-resume", lambda w, t: _train_argv(w, _copy(w.sae, t / "o")), "pass --resume"),
    ("train-resume-other-lr", lambda w, t: _train_argv(w, _copy(w.sae, t / "o"), "--resume", "--lr", "1e-3"),
     "train lr: None -> 0.001"),
    ("train-resume-other-width", lambda w, t: _train_argv(w, _copy(w.sae, t / "o"), "--resume", "--width", "256"),
     "saes .d_sae: 128 -> 256"),
    ("train-resume-other-arch", lambda w, t: _train_argv(w, _copy(w.sae, t / "o"), "--resume", "--arch", "batchtopk"),
     "arch: 'topk' -> 'batchtopk'"),
    ("train-resume-other-cache", lambda w, t: _train_argv(w, _copy(w.sae, t / "o"), "--resume", data=w.cache_nan),
     "data cache:"),
    ("train-resume-longer-budget", lambda w, t: _train_argv(w, _copy(w.sae, t / "o"), "--resume", "--tokens", "4096"),
     "total_tokens: 2048 -> 4096"),
    ("train-allow-change-lr", lambda w, t: _train_argv(w, _copy(w.sae, t / "o"), "--resume", "--allow-change", "lr"),
     "only total_tokens, log_every, checkpoint_every, device may change"),
    ("train-resume-flipped-checkpoint", lambda w, t: _train_argv(w, _copy(w.run_flip, t / "o"), "--resume"),
     "checkpoint.safetensors fails its checksum"),
    ("train-resume-truncated-checkpoint", lambda w, t: _train_argv(w, _copy(w.run_trunc, t / "o"), "--resume"),
     "checkpoint.safetensors fails its checksum"),
    ("train-resume-stub-checkpoint", lambda w, t: _train_argv(w, _copy(w.run_stub, t / "o"), "--resume"),
     "checkpoint.safetensors is not a readable safetensors file"),
    ("train-resume-nan-checkpoint", lambda w, t: _train_argv(w, _copy(w.run_nan, t / "o"), "--resume"),
     "holds non-finite values"),
    ("train-out-locked", lambda w, t: (_train_argv(w, t / "o"), _held(t / "o", "train")), "being written by another"),
    ("train-kl-without-model", lambda w, t: ["train", "--objective", "kl", "--data", str(w.train_txt), "--hook", HOOK,
                                             "--out", str(t / "o")], "--objective kl needs --model"),
    ("train-no-data", lambda w, t: ["train", "--out", str(t / "o")], "--data is required"),
    # ---- sweep
    ("sweep-width-word", lambda w, t: ["sweep", "--data", str(w.cache), "--arch", "topk", "--width", "128,big", "--k", "8",
                                       "--out", str(t / "o")], "cannot read 'big' as a count"),
    ("sweep-lam-nan", lambda w, t: ["sweep", "--data", str(w.cache), "--arch", "relu", "--width", "128", "--lam", "nan",
                                    "--out", str(t / "o")], "positive finite number"),
    ("sweep-lr-0", lambda w, t: ["sweep", "--data", str(w.cache), "--arch", "topk", "--width", "128", "--k", "8",
                                 "--lr", "0", "--out", str(t / "o")], "lr must be a finite number > 0"),
    # ---- eval
    ("eval-sae-missing", lambda w, t: _eval_argv(w, t / "none"), "does not exist"),
    ("eval-sae-flipped", lambda w, t: _eval_argv(w, w.sae_flip), "sae.safetensors fails its checksum"),
    ("eval-sae-truncated", lambda w, t: _eval_argv(w, w.sae_trunc), "sae.safetensors fails its checksum"),
    ("eval-sae-stub", lambda w, t: _eval_argv(w, w.sae_stub), "sae.safetensors is not a readable safetensors"),
    ("eval-sae-bad-cfg", lambda w, t: _eval_argv(w, w.sae_badcfg), "cfg.json is not valid JSON"),
    ("eval-sae-shape-mismatch", lambda w, t: _eval_argv(w, w.sae_shape), "tensor shapes do not match"),
    ("eval-sae-nan", lambda w, t: _eval_argv(w, w.sae_nan), "holds NaN/Inf values"),
    ("eval-sae-no-model", lambda w, t: _eval_argv(w, w.sae_nomodel), "do not record the model they were trained on"),
    ("eval-sae-wrong-width", lambda w, t: _eval_argv(w, w.sae_narrow), "expects widths d_in=32"),
    ("eval-context-len-1", lambda w, t: _eval_argv(w, w.sae, "--context-len", "1"), "--context-len >= 2"),
    ("eval-context-len-beyond-model", lambda w, t: _eval_argv(w, w.sae, "--context-len", "9999"), "exceeds the 512"),
    ("eval-tokens-0", lambda w, t: _eval_argv(w, w.sae, "--tokens", "0"), "not a positive whole count"),
    ("eval-dense-threshold-nan", lambda w, t: _eval_argv(w, w.sae, "--dense-threshold", "nan"), "not a finite number"),
    ("eval-dense-threshold-2", lambda w, t: _eval_argv(w, w.sae, "--dense-threshold", "2"), "dense_threshold must be in"),
    ("eval-batch-size-0", lambda w, t: _eval_argv(w, w.sae, "--batch-size", "0"), "--batch-size must be >= 1"),
    ("eval-data-not-utf8", lambda w, t: [str(w.bad_txt) if a == str(w.valid_txt) else a for a in _eval_argv(w, w.sae)],
     "is not UTF-8 text"),
    ("eval-out-locked", lambda w, t: (_eval_argv(w, w.sae, out=t / "o"), _held(t / "o", "eval")), "being written by another"),
    # ---- adapt
    ("adapt-rank-0", lambda w, t: _adapt_argv(w, t / "o", "--rank", "0"), "rank must be >= 1"),
    ("adapt-rank-negative", lambda w, t: _adapt_argv(w, t / "o", "--rank", "-4"), "rank must be >= 1"),
    ("adapt-lr-nan", lambda w, t: _adapt_argv(w, t / "o", "--lr", "nan"), "not a finite number"),
    ("adapt-dropout-1.5", lambda w, t: _adapt_argv(w, t / "o", "--dropout", "1.5"), "dropout must be"),
    ("adapt-tokens-0", lambda w, t: _adapt_argv(w, t / "o", "--tokens", "0"), "not a positive whole count"),
    ("adapt-context-len-beyond-model", lambda w, t: _adapt_argv(w, t / "o", "--context-len", "4096"), "exceeds the 512"),
    ("adapt-sae-no-model", lambda w, t: [a if a != str(w.sae) else str(w.sae_nomodel) for a in _adapt_argv(w, t / "o")],
     "(the SAE names none); pass --model"),
    ("adapt-eval-not-adapt-folder", lambda w, t: ["adapt", "eval", str(w.foreign)], "has no adapt.json"),
    # ---- dashboard
    ("dashboard-top-k-0", lambda w, t: _dash_argv(w, t / "o", "--top-k", "0"), "top_k must be positive"),
    ("dashboard-sae-wrong-width", lambda w, t: _dash_argv(w, t / "o", sae=w.sae_narrow), "holds width 64"),
    ("dashboard-sae-nan", lambda w, t: _dash_argv(w, t / "o", sae=w.sae_nan), "holds NaN/Inf values"),
    ("dashboard-cache-flipped", lambda w, t: _dash_argv(w, t / "o")[:4] + [str(w.cache_flip)] + _dash_argv(w, t / "o")[5:],
     "fails its checksum"),
    ("dashboard-out-locked", lambda w, t: (_dash_argv(w, t / "o"), _held(t / "o", "dashboard")), "being written by another"),
    # ---- convert
    ("convert-into-trained-run", lambda w, t: ["convert", str(w.sae), str(_copy(w.sae, t / "o")), "--to", "saelens"],
     "is not empty"),
    ("convert-src-missing", lambda w, t: ["convert", str(t / "none"), str(t / "o"), "--to", "saelens"], "does not exist"),
    ("convert-src-flipped", lambda w, t: ["convert", str(w.sae_flip), str(t / "o"), "--to", "saelens"], "fails its checksum"),
    ("convert-to-unknown", lambda w, t: ["convert", str(w.sae), str(t / "o"), "--to", "nope"], "nope"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses_with_one_line(case, w, tmp_path, capsys):
    _, build, needle, *rest = case
    expected_rc = rest[0] if rest else 2
    spec = build(w, tmp_path)
    argv, ctx = spec if isinstance(spec, tuple) else (spec, None)
    rc, line = _error_line(capsys, argv, ctx)
    assert rc == expected_rc, line
    assert needle in line, line


# ---- cases that need a finished run to damage first
def test_adapt_resume_refuses_a_flipped_checkpoint(w, adapt_run, tmp_path, capsys):
    out = _copy(adapt_run, tmp_path / "o")
    _flip(out / "adapt_checkpoint.safetensors")
    rc, line = _error_line(capsys, _adapt_argv(w, out, "--resume"))
    assert rc == 2 and "adapt_checkpoint.safetensors fails its checksum" in line


def test_adapt_resume_refuses_other_settings_and_eval_a_damaged_manifest(w, adapt_run, tmp_path, capsys):
    out = _copy(adapt_run, tmp_path / "o")
    rc, line = _error_line(capsys, _adapt_argv(w, out, "--resume", "--rank", "4"))
    assert rc == 2 and "rank: 64 -> 4" in line
    (out / "adapt.json").write_text("{ broken")
    rc, line = _error_line(capsys, ["adapt", "eval", str(out), "--eval-tokens", "100", "--no-progress"])
    assert rc == 2 and "adapt.json is damaged" in line
    # metrics.jsonl never repeats a step after a resume
    steps = [json.loads(x)["step"] for x in (adapt_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_eval_resume_refuses_a_damaged_state(w, eval_run, tmp_path, capsys):
    out = _copy(eval_run, tmp_path / "o")
    doc = json.loads((out / "eval_state.json").read_text())
    doc["state"]["recon"]["tokens"] += 1  # a changed number that still parses
    (out / "eval_state.json").write_text(json.dumps(doc))
    rc, line = _error_line(capsys, _eval_argv(w, w.sae, "--resume", out=out))
    assert rc == 2 and "eval_state.json fails its checksum" in line


def test_dashboard_resume_refuses_a_damaged_state(w, dash_run, tmp_path, capsys):
    out = _copy(dash_run, tmp_path / "o")
    _flip(out / ".build" / "state.safetensors")
    rc, line = _error_line(capsys, _dash_argv(w, out))
    assert rc == 2 and "state.safetensors fails its checksum" in line and "--overwrite" in line
    _stub(out / ".build" / "state.safetensors")
    rc, line = _error_line(capsys, _dash_argv(w, out))
    assert rc == 2 and "state.safetensors is not a readable safetensors file" in line


def test_harvest_refuses_to_resume_onto_changed_data(w, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_bytes(w.train_txt.read_bytes())
    out = tmp_path / "cache"
    assert main(_harvest_argv(w, out, data=data)) == 0
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False, "shards": m["shards"][:1]}))
    data.write_text("A different story.\n\n" + w.train_txt.read_text())
    rc, line = _error_line(capsys, _harvest_argv(w, out, data=data))
    assert rc == 2 and "--data changed since" in line and "new --out" in line


def test_foreign_checkpoint_missing_a_tensor(fixtures_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = next(p for p in sorted((fixtures_dir / "sae_lens").rglob("sae_weights.safetensors")))
    dst = _copy(src.parent, tmp_path / "sl")
    t = load_file(str(dst / "sae_weights.safetensors"))
    t.pop("W_dec")
    save_file(t, str(dst / "sae_weights.safetensors"))
    rc, line = _error_line(capsys, ["convert", str(dst), str(tmp_path / "o"), "--to", "saeforge"])
    assert rc == 2 and "lacks" in line and "W_dec" in line


def test_debug_flag_shows_the_traceback(w, tmp_path):
    with pytest.raises(Exception, match="--expansion 0"):
        main(["--debug"] + _train_argv(w, tmp_path / "o", "--expansion", "0"))


# ------------------------------------------------------------------------------------------------ the Python API
def _api_cases() -> list[tuple[str, Callable[[World, Path], Any], str, str]]:
    from saeforge.activations.cache import ActivationCache, HarvestConfig
    from saeforge.adapt import AdaptConfig
    from saeforge.dashboard.build import DashboardConfig
    from saeforge.eval import EvalConfig
    from saeforge.formats import load_sae
    from saeforge.sae import SAE, make_config
    from saeforge.train import TrainConfig

    def shard(cache):
        c = ActivationCache(cache)
        return [c.shard(i) for i in range(c.n_shards)]

    return [
        ("TrainConfig-lr-nan", lambda w, t: TrainConfig(lr=math.nan), "ConfigError", "lr must be a finite number > 0"),
        ("TrainConfig-tokens-negative", lambda w, t: TrainConfig(total_tokens=-1), "ConfigError", "pass a valid --tokens"),
        ("TrainConfig-batch-size-str", lambda w, t: TrainConfig(batch_size="4096"), "ConfigError", "must be an integer"),
        ("TrainConfig-log-every-0", lambda w, t: TrainConfig(log_every=0), "ConfigError", "log_every must be >= 1"),
        ("TrainConfig-betas", lambda w, t: TrainConfig(betas=(0.9, 1.5)), "ConfigError", "betas must be"),
        ("TrainConfig-optimizer", lambda w, t: TrainConfig(optimizer="sgd"), "ConfigError", "optimizer must be adam or signum"),
        ("TrainConfig-momentum-0", lambda w, t: TrainConfig(momentum=0.0), "ConfigError", "momentum must be a number in (0, 1)"),
        ("jumprelu-pre-act-nan", lambda w, t: make_config("jumprelu", d_in=64, d_sae=128, pre_act_coefficient=math.nan),
         "ConfigError", "pre_act_coefficient must be a finite number"),
        ("jumprelu-bandwidth-nan", lambda w, t: make_config("jumprelu", d_in=64, d_sae=128, bandwidth=math.nan),
         "ConfigError", "bandwidth must be a finite number > 0"),
        ("jumprelu-pre-act-rule", lambda w, t: make_config("jumprelu", d_in=64, d_sae=128, pre_act_rule="paper"),
         "ConfigError", "pre_act_rule must be scaled or published"),
        ("TrainConfig-json-bad-type", lambda w, t: TrainConfig.from_dict({"total_tokens": "5M"}), "ConfigError",
         "total_tokens must be an integer"),
        ("HarvestConfig-context-0", lambda w, t: HarvestConfig(model="m", data="d", hooks=[HOOK], out="o", context_len=0),
         "SaeforgeError", "context_len must be positive"),
        ("HarvestConfig-nonfinite-policy", lambda w, t: HarvestConfig(model="m", data="d", hooks=[HOOK], out="o",
                                                                      on_nonfinite="keep"), "SaeforgeError", "--on-nonfinite"),
        ("make_config-width-0", lambda w, t: make_config("topk", d_in=64, d_sae=0, k=8), "SaeforgeError",
         "widths must be positive"),
        ("make_config-k-str", lambda w, t: make_config("topk", d_in=64, d_sae=128, k="abc"), "ConfigError",
         "k must be an integer"),
        ("make_config-input-scale-nan", lambda w, t: make_config("topk", d_in=64, d_sae=128, k=8, input_scale=math.nan),
         "ConfigError", "input_scale must be a finite number"),
        ("AdaptConfig-rank-0", lambda w, t: AdaptConfig(rank=0), "ConfigError", "rank must be >= 1"),
        ("EvalConfig-tokens-0", lambda w, t: EvalConfig(n_tokens=0), "SaeforgeError", "n_tokens must be a positive"),
        ("DashboardConfig-top-k-0", lambda w, t: DashboardConfig(sae="s", data="d", out="o", top_k=0), "SaeforgeError",
         "top_k must be positive"),
        ("ActivationCache-flipped", lambda w, t: shard(w.cache_flip), "CorruptFileError", "fails its checksum"),
        ("ActivationCache-nan", lambda w, t: shard(w.cache_nan), "NonFiniteError", "NaN/Inf"),
        ("SAE.load-nan", lambda w, t: SAE.load(w.sae_nan), "NonFiniteError", "holds NaN/Inf values"),
        ("load_sae-flipped", lambda w, t: load_sae(w.sae_flip), "CorruptFileError", "fails its checksum"),
        ("load_checkpoint-truncated", lambda w, t: __import__("saeforge.train.checkpoint", fromlist=["x"]).load_checkpoint(
            w.run_stub / "checkpoint.safetensors"), "CorruptFileError", "not a readable safetensors file"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses(case, w, tmp_path):
    from saeforge.errors import SaeforgeError

    _, call, exc_name, needle = case
    with pytest.raises(SaeforgeError) as info:
        call(w, tmp_path)
    assert type(info.value).__name__ == exc_name or exc_name == "SaeforgeError", type(info.value)
    assert needle in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ real subprocesses
@pytest.mark.parametrize("argv_of, needle", [
    (lambda w, t: _train_argv(w, t / "o", "--tokens", "5Q"), "cannot read '5Q'"),
    (lambda w, t: _harvest_argv(w, t / "o", data=w.bad_txt), "is not UTF-8 text"),
    (lambda w, t: _train_argv(w, _copy(w.run_flip, t / "o"), "--resume"), "fails its checksum"),
], ids=["argparse-size", "non-utf8-data", "flipped-checkpoint"])
def test_no_traceback_reaches_the_terminal(argv_of, needle, w, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "saeforge", *argv_of(w, tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_size_limited_output_is_one_line(w, tmp_path):
    """A real RLIMIT_FSIZE (`ulimit -f`): the write fails with EFBIG and ends as one line."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "saeforge", *_harvest_argv(w, tmp_path / "o")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, preexec_fn=limit)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert proc.returncode == 2 and len(lines) == 1 and "size limit" in lines[0], proc.stderr
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]  # no torn temp file left


def test_eval_resume_refuses_a_damaged_chunk(w, tmp_path):
    from saeforge.errors import CorruptFileError
    from saeforge.eval import evaluate

    class Stop(Exception):
        pass

    def stop_after_two(phase, n):
        if phase == "recon" and n == 2:
            raise Stop

    kw = dict(model=str(w.model), n_tokens=160, context_len=32, batch_contexts=2, chunk_batches=1, progress=False,
              downstream=False, out=tmp_path / "e")
    with pytest.raises(Stop):
        evaluate(str(w.sae), data=str(w.valid_txt), on_chunk=stop_after_two, **kw)
    _flip(tmp_path / "e" / "eval_chunks" / "recon_000000.npz", offset=60)
    with pytest.raises(CorruptFileError, match="recon_000000.npz fails its checksum"):
        evaluate(str(w.sae), data=str(w.valid_txt), resume=True, **kw)


def test_an_unexpected_error_is_one_line_asking_for_a_report(w, tmp_path, capsys, monkeypatch):
    import saeforge.formats

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(saeforge.formats, "convert", boom)
    capsys.readouterr()
    rc = main(["convert", str(w.sae), str(tmp_path / "o"), "--to", "saelens"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "internal error: ZeroDivisionError: a bug" in err[0] and "--debug" in err[0]


def test_eval_resume_refuses_damaged_result_arrays(w, eval_run, tmp_path, capsys):
    out = _copy(eval_run, tmp_path / "o")
    _flip(out / "features.npz", offset=80)
    rc, line = _error_line(capsys, _eval_argv(w, w.sae, "--resume", out=out))
    assert rc == 2 and "features.npz fails its checksum" in line


def test_adapt_eval_refuses_a_damaged_adapter(w, adapt_run, tmp_path, capsys):
    out = _copy(adapt_run, tmp_path / "o")
    weights = next(p for p in (out / "adapter").rglob("*.safetensors"))
    _flip(weights)
    rc, line = _error_line(capsys, ["adapt", "eval", str(out), "--eval-tokens", "100", "--no-progress", "--device", "cpu"])
    assert rc == 2 and "fails its checksum" in line


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu", "crosscoder"])
@pytest.mark.parametrize("target", [-1.0, 0.0, float("nan"), float("inf")])
def test_target_l0_must_be_a_positive_number(arch, target):
    from saeforge.errors import SaeforgeError
    from saeforge.sae import make_config

    with pytest.raises(SaeforgeError, match=r"target_l0 must be a finite number > 0.*--set target_l0=VALUE"):
        make_config(arch, d_in=16, d_sae=32, target_l0=target)
