"""Provenance of a run, as MLflow tags: the code (git commit, a dirty tree), the package
versions, the host and the device it trained on, at what precision."""

from __future__ import annotations

import platform
import socket
import subprocess
from importlib.metadata import version
from pathlib import Path

import torch
import torchvision

import cityseg
from cityseg.runtime.device import device_name


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, str]:
    """Git commit (and whether the tree was dirty), package versions, device and host."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dirty = "unknown" if status is None else str(bool(status)).lower()
    # MLflow's standard tag for the commit (the UI's Source column); dirtiness has none
    return {"mlflow.source.git.commit": commit or "unknown", "git_dirty": dirty,
            "cityseg_version": cityseg.__version__, "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "mlflow_version": version("mlflow"),
            "python_version": platform.python_version(), "host": socket.gethostname(),
            "device": device_name(device),
            "precision": names[amp_dtype]}
