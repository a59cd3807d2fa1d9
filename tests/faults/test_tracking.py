"""Faults of the tracking store: several processes creating a new local store at once, and a
real `mlflow server` killed during training: never restarted (the run stops within the limit,
with a checkpoint that `--resume` finishes once the server is back), SIGTERM during the outage,
and back within seconds (the run is intact). Real `cityseg run` processes, real signals; each
test ends by reading the MLflow run: its status and one value per epoch."""

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cityseg import checkpoints, tracking
from cityseg.config import load_experiment
from cityseg.train.build import build_data
from cityseg.train.display import NullDisplay
from tests.conftest import QUICKSTART, tiny_overrides
from tests.conftest import wait_for as _wait_for

BIN = os.path.dirname(sys.executable)  # mlflow and uvicorn of this environment
KEYS = ("train/loss", "val/loss", "val/dice", "lr")


def command(settings, *args):
    return [sys.executable, "-m", "cityseg", "run", str(QUICKSTART),
            *sum((["--set", s] for s in settings), []), *args]


def runs_of(uri):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    return client, client.search_runs([experiment.experiment_id])


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_every_epoch_once(client, run_id, epochs):
    for key in KEYS:
        assert steps(client, run_id, key) == list(range(1, epochs + 1)), key
    panels = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert panels == [f"samples/epoch_{e:03d}.png" for e in range(1, epochs + 1)]


# ---------------------------------------------------------------- a new store, opened at once


@pytest.mark.slow  # three processes on a new store: about a minute on two cores
def test_three_runs_started_at_once_on_a_new_store_all_finish(tmp_path):
    data = tiny_overrides(tmp_path, epochs=1)
    build_data(load_experiment(QUICKSTART, data), NullDisplay())  # the race is the store's
    store = tmp_path / "store"
    procs = [subprocess.Popen(command([*data, f"tracking.dir={store}", f"seed={seed}",
                                       "tracking.log_model=false"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2, 3)]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    assert not any("Traceback" in err for err in errors), errors
    client, runs = runs_of(tracking.tracking_uri(store))
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    for run in runs:
        assert_every_epoch_once(client, run.info.run_id, epochs=1)


# ---------------------------------------------------------------- a tracking server that dies


class Server:
    """A real `mlflow server` on a port of its own and a SQLite backend, so that it can be
    killed and started again at the same URL with the same runs."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url, self.root, self.proc = f"http://127.0.0.1:{self.port}", root, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--workers", "1", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def kill(self) -> None:
        """kill -9 of the server and its workers: no answer, no goodbye."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def server(tmp_path):
    found = Server(tmp_path / "server")
    found.start()
    yield found
    found.stop()


def train(tmp_path, server, *settings, epochs=20):
    """A server-tracked run whose epochs take a few seconds (24 images, batches of 2)."""
    values = [*tiny_overrides(tmp_path, epochs=epochs), "tracking.log_model=false",
              "data.num_train=24", "data.batch_size=2", *settings]
    args = command(values, "--tracking-uri", server.url)
    return args, subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)



wait_for = functools.partial(_wait_for, timeout=300, every=0.1)  # a server in the loop


def logged_epochs(server):
    """The epochs the server has of the one run (none while there is no run)."""
    try:
        client, runs = runs_of(server.url)
        return steps(client, runs[0].info.run_id, "val/dice") if runs else []
    except Exception:  # noqa: BLE001  (no experiment yet)
        return []


def checkpoint_epoch(tmp_path):
    """Epochs the run's local last.pt has finished (0 without one)."""
    found = list((tmp_path / "runs" / "checkpoints").glob("*/last.pt"))
    try:
        return checkpoints.load(found[0])["state"]["epoch"] - 1 if found else 0
    except Exception:  # noqa: BLE001  (being replaced right now: look again)
        return 0


def resume_when_back(server, args, run_id, tmp_path):
    """Start the server again (same port, same runs) and finish the run with --resume."""
    server.start()
    done = subprocess.run([*args, "--resume", run_id], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    client, (run,) = runs_of(server.url)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert not (checkpoints.run_dir(tmp_path / "runs", run_id) / "unsent").exists()
    return client, run


def assert_lost_server_message(err, server, run_id, tmp_path):
    assert "Traceback" not in err, err
    assert f"the MLflow tracking server at {server.url} has not answered for" in err
    assert f"`--resume {run_id}`" in err
    last = checkpoints.path_of(tmp_path / "runs", run_id, "last")
    assert f"Its checkpoint is {last}" in err and last.is_file()


@pytest.mark.slow
def test_a_server_killed_for_good_stops_the_run_within_the_limit_and_resume_finishes_it(
        tmp_path, server):
    # the 18 epochs after the first unanswered call train for several times the limit (48
    # images an epoch), so the limit passes in training, not in the run's end
    limit_s = 4
    args, proc = train(tmp_path, server, f"tracking.outage_minutes={limit_s / 60}",
                       "data.num_train=48")
    wait_for(proc, lambda: logged_epochs(server) == [1])
    server.kill()
    killed = time.time()
    _, err = proc.communicate(timeout=limit_s + 120)
    assert proc.returncode == 2, err
    assert time.time() - killed < limit_s + 60  # the limit plus a minute
    (run_id,) = [p.name for p in (tmp_path / "runs" / "checkpoints").iterdir()]
    assert_lost_server_message(err, server, run_id, tmp_path)
    assert f"(tracking.outage_minutes: {limit_s / 60:g}" in err and "stopped" in err
    client, run = resume_when_back(server, args, run_id, tmp_path)
    assert_every_epoch_once(client, run_id, epochs=20)  # those trained blind included
    assert "has not answered" in run.data.tags["recovered_from"]


@pytest.mark.slow
def test_sigterm_during_an_outage_checkpoints_and_says_so(tmp_path, server):
    args, proc = train(tmp_path, server)
    wait_for(proc, lambda: logged_epochs(server) == [1])
    server.kill()
    wait_for(proc, lambda: checkpoint_epoch(tmp_path) >= 3)  # training goes on meanwhile
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    (run_id,) = [p.name for p in (tmp_path / "runs" / "checkpoints").iterdir()]
    assert f"SIGTERM stopped run {run_id} at " in err  # epoch E, batch B; or the end of E
    assert_lost_server_message(err, server, run_id, tmp_path)
    client, run = resume_when_back(server, args, run_id, tmp_path)
    assert_every_epoch_once(client, run_id, epochs=20)
    assert run.data.tags["recovered_from"].startswith(f"SIGTERM stopped run {run_id}")


@pytest.mark.slow
def test_a_server_back_within_seconds_leaves_the_run_intact(tmp_path, server):
    args, proc = train(tmp_path, server)
    wait_for(proc, lambda: logged_epochs(server) == [1])
    server.kill()
    server.start()  # as soon as it can (some seconds)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Traceback" not in err, err
    client, (run,) = runs_of(server.url)
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(client, run.info.run_id, epochs=20)
    assert not (checkpoints.run_dir(tmp_path / "runs", run.info.run_id) / "unsent").exists()
