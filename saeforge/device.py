"""Device and precision choices, in one place (no hard-coded "cuda" anywhere else)."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from saeforge.errors import SaeforgeError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaeforgeError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16).

    Without them PyTorch falls back to a scalar bf16 kernel that is far slower than fp32 (measured
    here: 0.47 GFLOP/s bf16 against 143 GFLOP/s fp32 on an AVX2-only EPYC), so bf16 is no default there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


# On CPUs that multiply bf16 natively, bf16 autocast only pays where the encoder product dominates the step:
# measured (benchmarks/train_step.py, one run per width) it was as fast as fp32 at d = 64 and 1.4-1.6x faster
# at d = 768, with the same FVU (docs/performance.md). Below this input width, "auto" stays fp32 on CPUs.
CPU_BF16_MIN_D_IN = 512


def resolve_dtype(name: str | None, device: torch.device, d_in: int | None = None) -> torch.dtype:
    """Autocast dtype for the SAE's matrix products. "auto": bf16 on CUDA with bf16 support, and on CPUs with
    AMX / AVX512-BF16 when the SAE's input width ``d_in`` is at least ``CPU_BF16_MIN_D_IN``; else fp32.
    Master weights, optimizer state and losses stay fp32."""
    if name in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_fast_bf16() and d_in is not None and d_in >= CPU_BF16_MIN_D_IN:
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise SaeforgeError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16")
    return DTYPES[name]
