"""The run session: every run it opens ends FINISHED, FAILED (with the reason) or KILLED.

Moved from tests/test_tracking.py (the session tests), with the Tracker's run helpers added."""

import signal

import pytest
from mlflow import MlflowClient

from cityseg import tracking
from cityseg.errors import Interrupted


def status_and_tags(root, run_id):
    run = MlflowClient(tracking_uri=tracking.tracking_uri(root)).get_run(run_id)
    return run.info.status, run.data.tags


def test_a_session_ends_finished_failed_or_killed(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    with tracker.session(run_name="ok", tags={"k": "v"}) as finished:
        assert status_and_tags(tmp_path, finished)[0] == "RUNNING"
    status, tags = status_and_tags(tmp_path, finished)
    assert status == "FINISHED" and tags["k"] == "v" and "failure" not in tags

    with pytest.raises(RuntimeError, match="boom"), tracker.session(run_name="bad") as failed:
        raise RuntimeError("boom")
    status, tags = status_and_tags(tmp_path, failed)
    assert status == "FAILED" and tags["failure"] == "boom"

    with pytest.raises(Interrupted), tracker.session(run_name="stopped") as killed:
        raise Interrupted(signal.SIGTERM, "x", "epoch 1")
    status, tags = status_and_tags(tmp_path, killed)
    assert status == "KILLED" and "failure" not in tags


def test_a_session_reattaches_to_an_earlier_run(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    with pytest.raises(KeyboardInterrupt), tracker.session(run_name="first") as run_id:
        raise KeyboardInterrupt
    assert status_and_tags(tmp_path, run_id)[0] == "KILLED"
    with tracker.session(reattach=run_id) as again:
        assert again == run_id and status_and_tags(tmp_path, run_id)[0] == "RUNNING"
    assert status_and_tags(tmp_path, run_id)[0] == "FINISHED"


def test_an_experiment_created_by_another_process_meanwhile_is_joined(tmp_path, monkeypatch):
    # two sweep workers start together: both find no experiment, one creates it first
    first = tracking.open(tmp_path, experiment="shared")
    real = MlflowClient.get_experiment_by_name
    calls = {"n": 0}

    def not_yet(self, name):
        calls["n"] += 1
        return None if calls["n"] == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", not_yet)
    second = tracking.open(tmp_path, experiment="shared")
    assert second.experiment_id == first.experiment_id and calls["n"] == 2


def test_runs_are_created_deleted_and_their_histories_read_without_the_client(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    run_id = tracker.create_run(run_name="parent", tags={"sweep_role": "parent"})
    status, tags = status_and_tags(tmp_path, run_id)
    # MLflow's own context tags are there, ours over them
    assert status == "RUNNING" and tags["sweep_role"] == "parent" and "mlflow.user" in tags
    with tracker.session(run_name="child") as child:
        for step, value in ((2, 0.5), (1, 0.25), (3, 0.75)):
            tracker.log_metrics({"val/dice": value}, step=step)
    assert tracker.metric_history(child, "val/dice") == [0.25, 0.5, 0.75]
    assert tracker.metric_history(child, "val/iou") == []
    tracker.delete_run(run_id)
    assert tracking.sweep_parents(tracker, "any") == []
    assert [r.info.run_id for r in tracker.find_runs("")] == [child]
