"""Fault injection: SIGKILL `saeforge harvest` and `saeforge train` (real subprocesses) at several points, rerun,
and check the results are byte-identical to uninterrupted runs (saeforge/faults.py names the points)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saeforge.cli import main

REPO = Path(__file__).resolve().parents[1]


def _harvest_argv(model, data, out) -> list[str]:
    return ["harvest", "--model", str(model), "--data", str(data), "--hooks", "resid_post.2", "--out", str(out),
            "--context-len", "32", "--batch-contexts", "8", "--shard-tokens", "512", "--max-tokens", "2500", "--quiet"]


def _train_argv(cache, out) -> list[str]:
    return ["train", "--data", str(cache), "--arch", "topk", "--width", "128", "--k", "8", "--tokens", "5120",
            "--batch-size", "256", "--shuffle-buffer", "2048", "--log-every", "4", "--checkpoint-every", "6",
            "--device", "cpu", "--dtype", "float32", "--no-progress", "--resume", "--out", str(out)]


def _killed(argv: list[str], point: str) -> None:
    env = {**os.environ, "SAEFORGE_KILL_AT": point, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "saeforge", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, (point, proc.returncode, proc.stderr[-2000:])


def _files(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "metrics.jsonl":  # wall-clock times differ between runs; everything else must not
                rows = [json.loads(x) for x in data.decode().splitlines()]
                data = json.dumps([{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]).encode()
            out[str(p.relative_to(folder))] = data
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stories_model_path, tinystories_train):
    root = tmp_path_factory.mktemp("ref")
    assert main(_harvest_argv(stories_model_path, tinystories_train, root / "cache")) == 0
    assert main(_train_argv(root / "cache", root / "sae")) == 0
    return root


@pytest.mark.parametrize("point", [
    "harvest:shard#2",                         # shard 2 listed in the manifest, shard 3 not begun
    "before-rename:manifest.json#4",           # shard 3 renamed, the manifest listing it not yet
    # (a kill with shard 3 complete in its temp file: tests/test_cache.py::test_killed_harvest_resumes_byte_identical)
])
def test_killed_harvest_reruns_byte_identical(point, reference, tmp_path, stories_model_path, tinystories_train):
    argv = _harvest_argv(stories_model_path, tinystories_train, tmp_path / "cache")
    _killed(argv, point)
    assert main(argv) == 0
    assert _files(tmp_path / "cache") == _files(reference / "cache")


@pytest.mark.parametrize("point", [
    "train:step#9",                                   # between checkpoints (steps 6 and 12)
    "before-rename:checkpoint.safetensors#2",         # the step-12 checkpoint written, not renamed
    "before-rename:sae.safetensors",                  # the final SAE written, not renamed
])
def test_killed_train_resumes_byte_identical(point, reference, tmp_path):
    argv = _train_argv(reference / "cache", tmp_path / "sae")
    _killed(argv, point)
    assert main(argv) == 0
    assert _files(tmp_path / "sae") == _files(reference / "sae")
    assert not [p for p in (tmp_path / "sae").iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_second_writer_is_refused_while_the_first_finishes_intact(reference, tmp_path, stories_model_path,
                                                                   tinystories_train, capsys):
    """Two harvests into one folder at once: the second is refused with one line, the first's cache is intact."""
    import fcntl
    import time

    out = tmp_path / "cache"
    argv = _harvest_argv(stories_model_path, tinystories_train, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen([sys.executable, "-m", "saeforge", *argv], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the first one holds the lock
        lock = out / ".saeforge.lock"
        if lock.exists():
            with open(lock) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
        time.sleep(0.05)
    else:
        first.kill()
        pytest.fail("the first harvest never took the lock")
    other = argv[:argv.index("--max-tokens") + 1] + ["2000", "--quiet"]  # different settings, same folder
    assert main(other) == 2
    assert "being written by another saeforge process" in capsys.readouterr().err
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert _files(out) == _files(reference / "cache")
