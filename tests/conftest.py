"""Shared fixtures: the REAL quickstart experiment, shrunk to seconds on a CPU."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cityseg.config import Experiment, load_experiment
from cityseg.tracking import store

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
CITYSCAPES_MINI = REPO.parent / "shared" / "data" / "cityscapes-mini"


def unavailable(what: str, install: str) -> None:
    """A tool a test needs is missing: skipped here, with how to `install` it; under CI
    (CI=true), whose .ci/run installs every such tool, a failure, since a skip there would
    leave a test that nothing runs."""
    message = f"{what} ({install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}: CI runs every test", pytrace=False)
    pytest.skip(message)


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


def cityseg_here(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """`cityseg ARGS` run in this process (in `cwd`, if given), as its console script runs it:
    (exit code, stdout, stderr). For tests of what a command does; a test of the process itself
    (a signal, kill -9, torchrun) starts `python -m cityseg` instead."""
    from cityseg.cli import main

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(before)
    return code, out.getvalue(), err.getvalue()


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


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """One new MLflow store, created and migrated once a session (about 2 s of migrations)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(autouse=True)
def _copied_stores(request, monkeypatch):
    """A store a test's run creates in-process starts as a copy of the session's migrated one,
    the same tables MLflow would make. Processes a test starts, and tests marked `new_store`
    (the creation is what they check), create theirs as a user's first run does."""
    if request.node.get_closest_marker("new_store"):
        return
    template = request.getfixturevalue("_migrated_store")
    creating = store._creating

    @contextlib.contextmanager
    def from_template(db: Path):
        with creating(db):
            if not db.exists():
                partial = db.with_name(f".{db.name}.copy")
                try:  # whole or not at all: a full disk leaves no half-copied store
                    shutil.copyfile(template, partial)
                    partial.replace(db)
                except OSError:
                    partial.unlink(missing_ok=True)
            yield

    monkeypatch.setattr(store, "_creating", from_template)


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
