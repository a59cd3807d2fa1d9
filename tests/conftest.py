"""Shared fixtures: the REAL quickstart experiment, shrunk to seconds on a CPU."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cityseg.config import Experiment, load_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
CITYSCAPES_MINI = REPO.parent / "shared" / "data" / "cityscapes-mini"


def tiny_overrides(tmp_path: Path, epochs: int = 2) -> list[str]:
    """Overrides that keep the quickstart's components but make it run in seconds."""
    return [
        f"data.root={tmp_path / 'synthetic'}", "data.num_train=6", "data.num_val=3",
        "data.source_size=[64,128]", "data.image_size=[32,64]", "data.batch_size=3",
        "data.num_workers=0", "model.depth=2", "model.base_channels=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"trainer.epochs={epochs}", "trainer.device=cpu", f"tracking.dir={tmp_path / 'runs'}",
        "tracking.num_samples=2",
    ]


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> Experiment:
    return load_experiment(QUICKSTART, tiny_overrides(tmp_path))


@pytest.fixture(autouse=True)
def _local_tracking(monkeypatch):
    """Tests track into their own temporary stores: never a server from the caller's shell,
    and never one an earlier test pointed MLflow's fluent API at."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def mlflow_process(*args: str, ready: str, env: dict[str, str] | None = None):
    """`mlflow <args> --host 127.0.0.1 --port <free port>` from this environment; yields its
    URL once GET <url><ready> answers, and stops it afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bin_dir = os.path.dirname(sys.executable)  # uvicorn and mlflow of this environment
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), *args, "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **(env or {}), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(f"{url}{ready}", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, f"mlflow {args[0]} did not start"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
