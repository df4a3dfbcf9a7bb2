"""The wheel: built from pyproject.toml, installed into a fresh venv, run from outside the source tree.

The venv uses ``--system-site-packages`` so torch and friends come from this environment, and the wheel is
installed with ``--no-deps``; the test checks that ``saeforge`` is imported from the venv (not from this
checkout, not from an editable install) and that the dashboard's static files travelled in the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

DIST = "saeforge-toolkit"  # the PyPI name (pyproject.toml); the import name and command stay `saeforge`


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path, stories_model_path: Path,
                                                        tinystories_train: Path) -> None:
    pytest.importorskip("build")
    import setuptools

    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} < 70.1 cannot build the wheel without isolation")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    # build from a copy, so no stale build/ folder leaks into the wheel and the checkout stays clean
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", "benchmarks"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
         cwd=tmp_path, env=env, timeout=300)
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    whl = wheels[0]
    assert whl.name.startswith(DIST.replace("-", "_") + "-"), whl.name
    names = set(zipfile.ZipFile(whl).namelist())
    for f in ("index.html", "app.js", "style.css"):
        assert f"saeforge/dashboard/static/{f}" in names, f"{f} missing from the wheel"
    assert "saeforge/releases.json" in names, "the release registry is missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)

    # a fresh venv that sees this environment's torch etc., but not this checkout's editable install
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          str(whl)], cwd=tmp_path, env=env, timeout=300)
    work = tmp_path / "outside"
    work.mkdir()
    # the venv's site-packages precede the system's on sys.path, so its saeforge wins over any editable one
    where = _run([str(py), "-c", "import saeforge, importlib.metadata as m, importlib.resources as r; "
                  "print(saeforge.__file__); print(m.version('saeforge-toolkit')); "
                  "print(r.files('saeforge.dashboard').joinpath('static/index.html').is_file())"],
                 cwd=work, env=env)
    file_, version, static = where.split()
    assert Path(file_).resolve().is_relative_to(env_dir.resolve()), file_
    assert version == "0.1.0" and static == "True"

    exe = env_dir / "bin" / "saeforge"
    assert "harvest" in _run([str(exe), "--help"], cwd=work, env=env)
    # a tiny end-to-end run from the installed command: stream activations from the model, train, write files
    _run([str(exe), "train", "--data", str(tinystories_train), "--model", str(stories_model_path),
          "--hook", "resid_post.2", "--arch", "topk", "--width", "64", "--k", "4", "--tokens", "4096",
          "--batch-size", "512", "--context-len", "64", "--shuffle-buffer", "2048", "--no-progress",
          "--out", "run"], cwd=work, env=env, timeout=180)
    assert (work / "run" / "sae.safetensors").is_file() and (work / "run" / "metrics.jsonl").is_file()
