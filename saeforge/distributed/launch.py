"""Start ``n`` local processes of a command as torchrun would (tests, benchmarks): loopback only.

``launch(n, argv)`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a free
``MASTER_PORT`` for each process and waits for all of them; the processes themselves open the group with
:func:`saeforge.distributed.init`. ``torchrun_argv`` builds a real ``torchrun`` command line instead.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["GLOO_SOCKET_IFNAME"] = env.get("GLOO_SOCKET_IFNAME", "lo")
    env["MASTER_ADDR"] = "127.0.0.1"
    env.update(extra or {})
    return env


def launch(n: int, argv: list[str], timeout: float = 300.0, env: dict[str, str] | None = None,
           cwd: str | Path | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``argv`` as ``n`` ranks of one process group; return each rank's completed process."""
    port = str(free_port())
    procs = []
    for r in range(n):
        e = loopback_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                          "MASTER_PORT": port, **(env or {})})
        log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty rank never blocks on a full pipe
        procs.append(subprocess.Popen(argv, env=e, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log = log  # type: ignore[attr-defined]
    return wait_all(procs, timeout)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Wait for every process; once one fails (or time runs out) stop the others, so nothing hangs in a
    collective waiting for a dead peer. Output is collected from every process either way."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p in procs:
        p.wait()
        log = getattr(p, "log", None)
        out = ""
        if log is not None:
            log.seek(0)
            out = log.read()
            log.close()
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    return results


def torchrun_argv(nproc: int, module_args: list[str], nnodes: int = 1, node_rank: int | None = None,
                  rdzv_endpoint: str | None = None, rdzv_id: str = "saeforge") -> list[str]:
    """``python -m torch.distributed.run ... -m <module_args>``; with ``rdzv_endpoint`` a c10d rendezvous."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if rdzv_endpoint is None:
        argv += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
        if node_rank is not None:
            argv.append(f"--node-rank={node_rank}")
    else:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return argv + ["-m", *module_args]
