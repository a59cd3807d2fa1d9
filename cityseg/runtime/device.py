"""The device a process computes on: which one, at what precision, seeded and (optionally)
deterministic."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from cityseg.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA); DataLoader order and augmentations are seeded
    per epoch and sample."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (trainer.deterministic); cuBLAS needs its workspace
    setting for that."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: {name!r} asked for, "
                          f"but CUDA is not available on this machine")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def device_name(device: torch.device) -> str:
    """cpu, or the GPU's name (with its index)."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"
