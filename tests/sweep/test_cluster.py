"""Sweeps across processes and machines: `cityseg sweep` workers sharing one Optuna study and
one MLflow tracking server, a worker killed outright, and (slow) PostgreSQL for both."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from cityseg.sweep import run_sweep
from tests.conftest import mlflow_process, unavailable
from tests.sweep.tiny import runs, write_sweep

GRID = {"loss.pos_weight": [1, 2], "trainer.threshold": [0.3, 0.7]}  # 4 points


def worker(path: Path, storage: str, uri: str | None = None) -> subprocess.Popen:
    """One `cityseg sweep` process: what each machine of a cluster runs."""
    args = [sys.executable, "-m", "cityseg.cli", "sweep", str(path), "--storage", storage]
    if uri:
        args += ["--tracking-uri", uri]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CI": "true"})


def check_one_parent_and_each_point_once(client: MlflowClient, points: int) -> None:
    experiment = client.get_experiment_by_name("quickstart")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in found if r.data.tags.get("sweep_role") == "child"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == points and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["sweep_point"] for c in children}) == points  # each point once
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    summary = client.download_artifacts(parents[0].info.run_id, "summary.csv")
    assert len(Path(summary).read_text().strip().splitlines()) == 1 + points


def two_workers(path: Path, storage: str, uri: str | None = None) -> list[str]:
    procs = [worker(path, storage, uri) for _ in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    return outputs


@pytest.mark.slow  # about 47 s on two quiet cores: `make test-slow`
def test_two_workers_share_one_study_and_one_parent_through_an_mlflow_server(tmp_path):
    root = tmp_path / "server"
    path = write_sweep(tmp_path, GRID)
    with mlflow_process("server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
                        ready="/health") as url:
        outputs = two_workers(path, f"sqlite:///{tmp_path / 'study.db'}", url)
        check_one_parent_and_each_point_once(MlflowClient(tracking_uri=url), 4)
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # everything went to the server
    trained = [line for out in outputs for line in out.splitlines() if ": training (trial" in line]
    assert len(trained) == 4, outputs


@pytest.mark.slow  # about 20 s on two quiet cores: `make test-slow`
def test_a_worker_killed_outright_leaves_its_trial_to_be_retried_and_its_child_resumed(tmp_path):
    path = write_sweep(tmp_path, {"loss.pos_weight": [1, 2]}, heartbeat_seconds=1,
                       set={"trainer.epochs": 3, "data.num_train": 24, "data.batch_size": 2})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = worker(path, storage)
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("checkpoints/*/last.pt")):  # an epoch is done
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client, (parent,), (killed,) = runs(tmp_path)
    assert killed.info.status == "RUNNING"  # nobody ended it
    # polled: the trial's Optuna heartbeat is older than its grace period (2 s)
    heartbeats = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
    study_id = heartbeats.get_study_id_from_name(parent.data.tags["sweep_id"])
    deadline = time.time() + 60
    while not heartbeats._get_stale_trial_ids(study_id):
        assert time.time() < deadline, "the killed worker's trial never went stale"
        time.sleep(0.1)

    lines = []
    run_sweep(path, storage=storage, report=lines.append)
    client, parents, children = runs(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert any(f"resuming {killed.info.run_id}" in line for line in lines), lines
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "val/dice")]
    assert steps == [1, 2, 3]
    study = optuna.load_study(study_name=parents[0].data.tags["sweep_id"], storage=storage)
    retried = [t for t in study.trials if "failed_trial" in t.system_attrs]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert study.trials[retried[0].system_attrs["failed_trial"]].state.name == "FAIL"


# ------------------------------------------------------------------ PostgreSQL (slow)


def _postgres_bin() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's `postgresql` package); its URL
    for SQLAlchemy with psycopg 3."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL is not installed", "apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("no psycopg", "pip install 'cityseg[cluster]'")
    # its own folder: as root, the cluster belongs to the postgres user (initdb refuses root),
    # who cannot enter pytest's private temporary folders
    folder = Path(tempfile.mkdtemp(prefix="cityseg-pg-"))
    data, sockets = folder / "pgdata", folder / "pgsock"
    sockets.mkdir()
    as_user = [] if os.geteuid() else ["runuser", "-u", "postgres", "--"]
    if as_user:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "cityseg",
                    "--auth=trust"], check=True, capture_output=True)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l",
                    str(folder / "pg.log"), "-o",
                    f"-h 127.0.0.1 -p {port} -k {sockets}", "start"], check=True,
                   capture_output=True)
    try:
        for name in ("mlflow", "optuna"):
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                            "-U", "cityseg", name], check=True, capture_output=True)
        yield f"postgresql+psycopg://cityseg@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_with_postgresql_for_mlflow_and_optuna(tmp_path, postgres):
    root = tmp_path / "server"
    path = write_sweep(tmp_path, GRID)
    with mlflow_process("server", "--backend-store-uri", f"{postgres}/mlflow",
                        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
                        ready="/health") as url:
        two_workers(path, f"{postgres}/optuna", url)
        check_one_parent_and_each_point_once(MlflowClient(tracking_uri=url), 4)
