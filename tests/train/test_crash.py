"""Crashes that cannot be caught: kill -9, a full disk, corrupt files, two writers of one run.

Every training process here is a real subprocess, killed by its pid.
"""

import errno
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from cityseg import checkpoints, tracking
from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.train import runner
from tests.conftest import NO_MODEL, QUICKSTART, runs_of, steps, tiny_overrides, wait_for


def overrides(tmp_path, epochs=4, minutes=0.0):
    """Long enough epochs (12 steps) to be killed in the middle of one; deterministic."""
    return [*tiny_overrides(tmp_path, epochs=epochs), NO_MODEL, "data.num_train=24",
            "data.batch_size=2", "trainer.deterministic=true",
            f"trainer.checkpoint_minutes={minutes}"]


def start(settings):
    args = [sys.executable, "-m", "cityseg.cli", "run", str(QUICKSTART)]
    for setting in settings:
        args += ["--set", setting]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)



def last_checkpoint(root):
    found = list((root / "checkpoints").glob("*/last.pt"))
    if not found:
        return None
    try:
        return checkpoints.load(found[0])
    except Exception:  # noqa: BLE001  (being replaced right now: look again)
        return None


def without_speed(metrics):
    return {k: v for k, v in metrics.items() if k != "throughput/img_s"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same experiment, never interrupted."""
    tmp_path = tmp_path_factory.mktemp("straight")
    return runner.run(load_experiment(QUICKSTART, overrides(tmp_path)))


@pytest.mark.parametrize("minutes", [0.0, 1e-4], ids=["epoch-checkpoints", "step-checkpoints"])
def test_kill_9_then_resume_auto_continues_the_same_run_to_the_same_metrics(
        tmp_path, straight, minutes):
    settings = overrides(tmp_path, minutes=minutes)
    proc = start(settings)
    root = tmp_path / "runs"

    def position():
        checkpoint = last_checkpoint(root)
        return None if checkpoint is None else (checkpoint["state"]["epoch"],
                                                checkpoint["state"]["step_in_epoch"])

    if minutes:  # every step checkpoints: kill once one of them is mid-epoch
        wait_for(proc, lambda: (position() or (0, 0))[1] > 0)
    else:  # kill somewhere after the first epoch's checkpoint
        wait_for(proc, lambda: position() is not None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    client, (crashed,) = runs_of(root)
    assert crashed.info.status == "RUNNING" and tracking.shown_status(crashed) == "CRASHED"

    assert main(["run", str(QUICKSTART), *sum((["--set", s] for s in settings), []),
                 "--resume", "auto"]) == 0
    client, (run,) = runs_of(root)
    assert run.info.run_id == crashed.info.run_id and run.info.status == "FINISHED"
    for key in ("val/dice", "train/loss", "val/loss"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    assert run.data.tags["resumed_after_crash"].endswith("is gone")
    if minutes:  # started in the middle of an epoch, not at its boundary
        assert re.fullmatch(r"batch \d+ of epoch \d+", run.data.tags["resumed_at"])
    else:
        assert re.fullmatch(r"the end of epoch \d+", run.data.tags["resumed_at"])
    final = {k: client.get_metric_history(run.info.run_id, k)[-1].value for k in straight.metrics}
    assert without_speed(final) == pytest.approx(without_speed(straight.metrics), rel=1e-6,
                                                 abs=1e-9)


@pytest.mark.slow  # about 20 s on two quiet cores: `make test-slow`
def test_clean_marks_the_crashed_run_leaves_the_live_one_and_refuses_a_second_writer(
        tmp_path, capsys):
    root = tmp_path / "runs"
    doomed = start([*overrides(tmp_path / "a", epochs=200), f"tracking.dir={root}"])
    wait_for(doomed, lambda: last_checkpoint(root) is not None)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    client, (dead_run,) = runs_of(root)
    live_settings = [*overrides(tmp_path / "b", epochs=200), f"tracking.dir={root}", "seed=7"]
    live = start(live_settings)
    try:
        wait_for(live, lambda: len(runs_of(root)[1]) == 2)
        (live_run,) = [r for r in runs_of(root)[1] if r.info.run_id != dead_run.info.run_id]

        assert main(["compare", "--runs", str(root)]) == 0
        assert "CRASHED" in capsys.readouterr().out

        # a second command writing into the live run is refused, naming its host and pid
        code = main(["run", str(QUICKSTART), *sum((["--set", s] for s in live_settings), []),
                     "--resume", live_run.info.run_id])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert f"pid {live.pid} on host {socket.gethostname()}" in err and "alive" in err

        assert main(["runs", "clean", "--runs", str(root)]) == 0
        assert "1 crashed run(s) marked FAILED" in capsys.readouterr().out
        dead = client.get_run(dead_run.info.run_id)
        assert dead.info.status == "FAILED" and dead.data.tags["crashed"].endswith("is gone")
        assert client.get_run(live_run.info.run_id).info.status == "RUNNING"
        assert live.poll() is None
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=60)
    assert client.get_run(live_run.info.run_id).info.status == "KILLED"


def test_a_full_disk_while_checkpointing_fails_the_run_and_keeps_the_earlier_checkpoint(
        tmp_path, monkeypatch, capsys):
    settings = [*tiny_overrides(tmp_path, epochs=3), NO_MODEL]
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):  # epoch 1 writes last.pt and best.pt; epoch 2's last.pt hits a full disk
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pt.part"):  # checkpoints, not caches
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    code = main(["run", str(QUICKSTART), *sum((["--set", s] for s in settings), [])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot write checkpoint" in err and "No space left on device" in err
    assert "last.pt is intact" in err
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["failure"]
    folder = checkpoints.run_dir(tmp_path / "runs", run.info.run_id)
    # no temporary file (per_frame.npz: the best epoch's per-frame counts)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "per_frame.npz"]
    assert checkpoints.load(folder / "last.pt")["epoch"] == 1


def without_checkpoint_artifacts(root, run_id):
    """The intact copies the run's end uploaded, which evaluate and resume would use, gone."""
    run = runs_of(root)[0].get_run(run_id)
    get_artifact_repository(run.info.artifact_uri).delete_artifacts("checkpoints")


def test_a_truncated_checkpoint_is_named_by_evaluate_predict_and_resume(tmp_path, capsys):
    settings = [*tiny_overrides(tmp_path, epochs=1), NO_MODEL]
    result = runner.run(load_experiment(QUICKSTART, settings))
    for name in ("best", "last"):
        path = result.checkpoints[name]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    without_checkpoint_artifacts(tmp_path / "runs", result.run_id)
    runs = str(tmp_path / "runs")
    for command in (["evaluate", "--run", result.run_id, "--runs", runs, "--no-log"],
                    ["predict", "--run", result.run_id, "--runs", runs, str(tmp_path),
                     "--out", str(tmp_path / "out")],
                    ["evaluate", "--checkpoint", str(result.checkpoints["best"])]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(result.checkpoints["best"]) in err
        assert "truncated or corrupt" in err
    code = main(["run", str(QUICKSTART), *sum((["--set", s] for s in settings), []),
                 "--set", "trainer.epochs=2", "--resume", result.run_id])
    err = capsys.readouterr().err
    assert code == 2 and str(result.checkpoints["last"]) in err
    assert str(result.checkpoints["best"]) in err and "Traceback" not in err


def test_resume_falls_back_to_best_only_when_asked(tmp_path, capsys):
    settings = [*tiny_overrides(tmp_path, epochs=2), NO_MODEL]
    result = runner.run(load_experiment(QUICKSTART, settings))
    last = result.checkpoints["last"]
    last.write_bytes(b"garbage")
    without_checkpoint_artifacts(tmp_path / "runs", result.run_id)
    again = [*sum((["--set", s] for s in settings), []), "--set", "trainer.epochs=3"]
    assert main(["run", str(QUICKSTART), *again, "--resume", result.run_id]) == 2
    assert "--fallback-best" in capsys.readouterr().err
    assert main(["run", str(QUICKSTART), *again, "--resume", result.run_id,
                 "--fallback-best"]) == 0
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val/dice")[-1] == 3
