"""Which machine the figures come from: CPU model, cores, the matrix instructions torch uses,
the GPU. The same benchmark gave a bf16 matmul peak of 2.42 TFLOP/s on one 2-core host and
0.86 on another of the same name, so every report carries this block."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# the instructions that decide CPU matmul speed: bf16 dot products (AVX512-BF16) and tiles
# (AMX) make bf16 autocast pay off; AVX-512 and AVX2 are the fp32 vector widths
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def _cpuinfo(path: Path) -> tuple[str, set[str]] | None:
    """(model name, flags) of the first processor in /proc/cpuinfo; None where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    first = text.split("\n\n", 1)[0]  # every processor repeats the same block
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    return fields.get("model name", "unknown"), set(fields.get("flags", "").split())


def host(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The host block of a report; `cpu_flags` is null where /proc/cpuinfo cannot be read."""
    found = _cpuinfo(cpuinfo)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": found[0] if found else "unknown (no /proc/cpuinfo)",
        "cpu_count": os.cpu_count(), "cpu_affinity": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": {flag: flag in found[1] for flag in CPU_FLAGS} if found else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def describe(h: dict) -> str:
    """One line: `AMD EPYC, 2 CPUs (2 usable, 2 torch threads), torch AVX2; ...`."""
    flags = h["cpu_flags"]
    present = ("flags unknown" if flags is None else
               ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in flags.items()))
    return (f"{h['cpu']}, {h['cpu_count']} CPUs ({h['cpu_affinity']} usable, "
            f"{h['torch_threads']} torch threads), torch CPU capability {h['cpu_capability']}; "
            f"{present}; GPU: {h['gpu'] or 'none'}; torch {h['torch']}")
