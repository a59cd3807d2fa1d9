"""Shared fixtures: the REAL quickstart experiment, shrunk to seconds on a CPU."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cityseg.config import Experiment, load_experiment
from cityseg.tracking import store

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
CITYSCAPES_MINI = REPO.parent / "shared" / "data" / "cityscapes-mini"
AACHEN = REPO.parent / "shared" / "data" / "aachen-sequences"
MOBILENET_V2_WEIGHTS = (REPO.parent / "shared" / "data" / "weights"
                        / "mobilenet_v2-imagenet-features.pth")
NO_MODEL = "tracking.log_model=false"


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


# ---------------------------------------------------------------- runs, read back from a store


def runs_of(root: Path):
    """The client of the store in tracking dir `root` and the quickstart runs in it (none when
    the run never opened; reading a store that was never made would make one)."""
    if not root.exists():
        return None, []
    client = MlflowClient(tracking_uri=store.tracking_uri(root))
    experiment = client.get_experiment_by_name("quickstart")
    return client, [] if experiment is None else client.search_runs([experiment.experiment_id])


def only_run(root: Path):
    """The client of the store in tracking dir `root` and its one quickstart run."""
    client, (run,) = runs_of(root)
    return client, run


def steps(client: MlflowClient, run_id: str, key: str = "val/dice") -> list[int]:
    """The steps at which the run logged `key`, in the order MLflow returns them."""
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """One tiny quickstart run with a description and a registered model."""
    from cityseg.train import runner

    tmp_path = tmp_path_factory.mktemp("mlflow")
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2),
                                       "description=tiny streets, two epochs",
                                       "tracking.register_model=streets"])
    with pytest.MonkeyPatch.context() as patch:  # sample system metrics often in a short run
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        result = runner.run(exp)
    client = MlflowClient(tracking_uri=store.tracking_uri(tmp_path / "runs"))
    return tmp_path, exp, result, client, client.get_run(result.run_id)


# ---------------------------------------------------------------- models and pictures


def random_model(folder: Path, task: str) -> Path:
    """A checkpoint of an untrained tiny model, made in a second. Its output layer's bias is
    zeroed and its weights drawn wide, so its labels follow the photo (its random features)
    instead of being one class everywhere, the largest bias."""
    import torch

    from cityseg import checkpoints
    from cityseg.registry import MODELS

    loss = "cross_entropy" if task == "multiclass" else "weighted_bce"
    exp = load_experiment(QUICKSTART, [*tiny_overrides(folder), f"data.task={task}",
                                       f"loss={{name: {loss}}}"])
    torch.manual_seed(0)
    model = MODELS.build(exp.model, exp.build_context())
    torch.nn.init.zeros_(model.outc.bias)
    torch.nn.init.normal_(model.outc.weight)
    path = folder / f"{task}.pt"
    checkpoints.save_atomic({"format": checkpoints.FORMAT, "config": exp.model_dump(mode="json"),
                             "state": {}, "model": model.state_dict(), "run_id": "untrained"},
                            path)
    return path


def frame():
    """A real Cityscapes frame if the shared data is there, else a synthetic street."""
    found = sorted(CITYSCAPES_MINI.glob("leftImg8bit/val/*/*_leftImg8bit.png"))
    if found:
        return found[0], np.asarray(Image.open(found[0]).convert("RGB"))
    return None, np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: what a decompression bomb's
    header looks like to PIL, in 70 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def positional_pair(height=96, width=192):
    """A frame whose mask is a function of pixel position (16-pixel blocks numbered across
    both axes) and whose red channel encodes the same number: alignment is checkable anywhere."""
    import torch
    from torchvision import tv_tensors

    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    label = ((y // 16) * 5 + (x // 16)) % 20
    image = torch.stack([label * 12, y % 256, x % 256]).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(label.to(torch.uint8))


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


def wait_for(proc, condition, *, timeout: float = 180, every: float = 0.02) -> None:
    """Poll `condition` until it holds, failing when `proc` ends first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()}"
        assert time.time() < deadline, "timed out"
        time.sleep(every)
