"""The run session: every run it opens ends FINISHED, FAILED (with the reason) or KILLED."""

import signal

import pytest
from mlflow import MlflowClient

from cityseg import tracking
from cityseg.errors import Interrupted


def status_and_tags(root, run_id):
    run = MlflowClient(tracking_uri=tracking.tracking_uri(root)).get_run(run_id)
    return run.info.status, run.data.tags


def test_a_session_ends_finished_failed_or_killed(tmp_path):
    tracker = tracking.Tracker(root=tmp_path, experiment="e")
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
    tracker = tracking.Tracker(root=tmp_path, experiment="e")
    with pytest.raises(KeyboardInterrupt), tracker.session(run_name="first") as run_id:
        raise KeyboardInterrupt
    assert status_and_tags(tmp_path, run_id)[0] == "KILLED"
    with tracker.session(reattach=run_id) as again:
        assert again == run_id and status_and_tags(tmp_path, run_id)[0] == "RUNNING"
    assert status_and_tags(tmp_path, run_id)[0] == "FINISHED"


def test_an_experiment_created_by_another_process_meanwhile_is_joined(tmp_path, monkeypatch):
    # two sweep workers start together: both find no experiment, one creates it first
    first = tracking.Tracker(root=tmp_path, experiment="shared")
    real = MlflowClient.get_experiment_by_name
    calls = {"n": 0}

    def not_yet(self, name):
        calls["n"] += 1
        return None if calls["n"] == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", not_yet)
    second = tracking.Tracker(root=tmp_path, experiment="shared")
    assert second.experiment_id == first.experiment_id and calls["n"] == 2


def test_tag_writes_that_race_on_a_unique_row_are_retried_other_calls_are_not():
    # two workers tagging one experiment at the same moment: the server's insert of the loser
    # fails on the row the winner just wrote; writing the tag again updates that row
    class Store:
        def __init__(self):
            self.calls = 0

        def _race_once(self, *args):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint "
                                   "failed: experiment_tags.key, experiment_tags.experiment_id")
            return "ok"

        set_experiment_tag = set_tag = create_run = _race_once

    for name in ("set_experiment_tag", "set_tag"):
        store = Store()
        assert getattr(tracking._RetryingClient(store, "x"), name)("1", "k", "v") == "ok"
        assert store.calls == 2
    with pytest.raises(RuntimeError, match="UNIQUE constraint"):
        tracking._RetryingClient(Store(), "x").create_run("1")
