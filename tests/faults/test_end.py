"""Faults in a run's end, after its last epoch (uploads, reports, the model): a full disk, a
signal, kill -9; and a run killed before its first checkpoint. Real `cityseg run` processes;
hooks (a sitecustomize.py on PYTHONPATH, switched on by an environment variable) say when."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cityseg import tracking
from tests.conftest import QUICKSTART, tiny_overrides

HOOKS = '''
import os, time
from pathlib import Path
hook = os.environ.get("CITYSEG_TEST_HOOK", "")
marker = Path(os.environ.get("CITYSEG_TEST_MARKER", "marker"))


def stall(real):
    def stalled(*args, **kwargs):  # says where it is, then waits for the test's word
        marker.write_text("here")
        while not marker.with_suffix(".go").exists():
            time.sleep(0.05)
        return real(*args, **kwargs)
    return stalled


if hook == "enospc-in-model":
    import errno
    from cityseg.deploy import pyfunc

    def log_model(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    pyfunc.log_model = log_model
if hook == "stall-in-end":
    from cityseg.train.recorder import Recorder
    Recorder._upload_checkpoints = stall(Recorder._upload_checkpoints)
if hook == "stall-in-model":  # inside MLflow's logging, the logged model PENDING
    import mlflow.pyfunc
    mlflow.pyfunc.log_model = stall(mlflow.pyfunc.log_model)
if hook == "stall-in-first-epoch":
    from cityseg.train.trainer import Trainer
    Trainer.train_epoch = stall(Trainer.train_epoch)
'''


@pytest.fixture
def settings(tmp_path):
    return [*tiny_overrides(tmp_path, epochs=2)]


def cityseg_run(tmp_path, settings, *args, hook="", wait=True):
    (tmp_path / "hooks").mkdir(exist_ok=True)
    (tmp_path / "hooks" / "sitecustomize.py").write_text(HOOKS)
    command = [sys.executable, "-m", "cityseg.cli", "run", str(QUICKSTART),
               *sum((["--set", s] for s in settings), []), *args]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hooks"), "CITYSEG_TEST_HOOK": hook,
           "CITYSEG_TEST_MARKER": str(tmp_path / "marker")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def wait_for_marker(tmp_path, proc, timeout=240):
    deadline = time.time() + timeout
    while not (tmp_path / "marker").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the hook was never reached"
        time.sleep(0.05)


def the_run(tmp_path):
    client = MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path / "runs"))
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def epochs_logged(client, run_id):
    return [m.step for m in client.get_metric_history(run_id, "val/dice")]


def assert_finished_with_its_end(client, run_id):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, run_id) == [1, 2]  # one value per epoch, none lost or doubled
    assert run.data.tags[tracking.STAGE_TAG] == "done" and "model_uri" in run.data.tags
    assert "failure" not in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"learning_curves.png", "confusion_matrix.json"} <= artifacts
    return run


@pytest.mark.slow  # about 25 s on two quiet cores: `make test-slow`
def test_a_full_disk_in_the_end_fails_truthfully_and_resume_auto_redoes_only_the_end(
        tmp_path, settings):
    code, _, err = cityseg_run(tmp_path, settings, hook="enospc-in-model")
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) < 12
    assert "No space left on device" in err and "--resume" in err
    client, (run,) = the_run(tmp_path)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["failure"]
    assert run.data.tags[tracking.STAGE_TAG] == "end"
    assert epochs_logged(client, run.info.run_id) == [1, 2]

    code, out, err = cityseg_run(tmp_path, settings, "--resume", "auto")
    assert code == 0, err
    client, (resumed,) = the_run(tmp_path)  # the same run, not a new one
    finished = assert_finished_with_its_end(client, run.info.run_id)
    assert "No space left" in finished.data.tags["recovered_from"]
    assert finished.data.tags["resumed_at"] == "the run's end (its epochs were done)"


@pytest.mark.slow  # about 23 s on two quiet cores: `make test-slow`
@pytest.mark.parametrize("hook", ["stall-in-end", "stall-in-model"])
def test_sigterm_in_the_end_ends_killed_with_a_message_and_resume_finishes_it(
        tmp_path, settings, hook):
    proc = cityseg_run(tmp_path, settings, hook=hook, wait=False)
    wait_for_marker(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "marker.go").write_text("go")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert "stopped at the run's end" in err and "--resume" in err
    client, (run,) = the_run(tmp_path)
    assert run.info.status == "KILLED"

    code, _, err = cityseg_run(tmp_path, settings, "--resume", run.info.run_id)
    assert code == 0, err
    assert_finished_with_its_end(client, run.info.run_id)
    assert_one_model(client, run)


@pytest.mark.slow  # two training processes: `make test-slow`
@pytest.mark.parametrize("hook", ["stall-in-end", "stall-in-model"])
def test_kill_9_in_the_end_leaves_a_run_that_resume_auto_finishes(tmp_path, settings, hook):
    proc = cityseg_run(tmp_path, settings, hook=hook, wait=False)
    wait_for_marker(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    client, (run,) = the_run(tmp_path)
    assert run.info.status == "RUNNING" and tracking.shown_status(run) == "CRASHED"
    dead = list(Path(tempfile.gettempdir()).glob(f"cityseg-model-{proc.pid}-*"))
    assert len(dead) == (hook == "stall-in-model")  # the killed process's model folder

    code, _, err = cityseg_run(tmp_path, settings, "--resume", "auto")
    assert code == 0, err
    client, (resumed,) = the_run(tmp_path)
    assert_finished_with_its_end(client, run.info.run_id)
    assert "is gone" in resumed.data.tags["resumed_after_crash"]
    assert_one_model(client, run)
    assert not any(folder.exists() for folder in dead)  # removed by the next model's logging


def assert_one_model(client, run):
    """The run's model, logged once: a model begun by a stopped process is gone (deleted)."""
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.status.to_str() if hasattr(m.status, "to_str") else str(m.status)
            for m in models] in (["READY"], ["LoggedModelStatus.READY"]), models
    assert client.get_run(run.info.run_id).data.tags["model_uri"] == f"models:/{models[0].model_id}"


@pytest.mark.slow  # two training processes: `make test-slow`
def test_a_run_killed_before_its_first_checkpoint_is_marked_crashed_by_the_next_that_looks(
        tmp_path, settings):
    proc = cityseg_run(tmp_path, settings, hook="stall-in-first-epoch", wait=False)
    wait_for_marker(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    client, (dead,) = the_run(tmp_path)
    assert dead.info.status == "RUNNING"

    code, out, err = cityseg_run(tmp_path, settings, "--resume", "auto")
    assert code == 0, err
    assert "starting a new one" in out
    client, runs = the_run(tmp_path)
    assert len(runs) == 2
    dead = client.get_run(dead.info.run_id)
    assert dead.info.status == "FAILED" and dead.data.tags["crashed"].endswith("is gone")
    (new,) = [r for r in runs if r.info.run_id != dead.info.run_id]
    assert_finished_with_its_end(client, new.info.run_id)
