"""Where runs are tracked: a read never creates a store, and the client retries only what is
safe to retry. (The retry test moved from tests/test_tracking.py.)"""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from cityseg import tracking
from cityseg.errors import StorageError
from cityseg.tracking import store

pytestmark = pytest.mark.new_store  # opening and creating stores is what this file checks


def test_a_read_only_open_of_a_missing_store_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "runs"
    with pytest.raises(tracking.NoStore, match=f"no MLflow store at {root / 'mlflow.db'}"):
        tracking.open(root, experiment="e", create=False)
    with pytest.raises(tracking.NoStore, match="no MLflow store"):
        tracking.open_store(root)
    assert not root.exists()  # no folder, no empty mlflow.db


def test_a_read_only_open_needs_the_experiment_and_leaves_the_store_as_it_was(tmp_path):
    created = tracking.open(tmp_path, experiment="there")
    with pytest.raises(tracking.NoStore, match="no MLflow experiment 'elsewhere' in .*mlflow.db"):
        tracking.open(tmp_path, experiment="elsewhere", create=False)
    names = [e.name for e in tracking.open_store(tmp_path).client.search_experiments()]
    assert "elsewhere" not in names
    again = tracking.open(tmp_path, experiment="there", create=False)
    assert again.experiment_id == created.experiment_id and again.uri == created.uri
    assert not again.remote and again.root == tmp_path


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
        fake = Store()
        assert getattr(store.RetryingClient(fake, "x"), name)("1", "k", "v") == "ok"
        assert fake.calls == 2
    with pytest.raises(RuntimeError, match="UNIQUE constraint"):
        store.RetryingClient(Store(), "x").create_run("1")


def test_printed_ui_links_name_the_port_the_ui_serves_on(tmp_path, monkeypatch, capsys):
    from cityseg.cli import main

    created = tracking.open(tmp_path, experiment="streets")
    page = f"/#/experiments/{created.experiment_id}/runs"
    monkeypatch.delenv(tracking.UI_PORT_ENV, raising=False)
    assert tracking.run_url(created.experiment_id, "r1") == f"http://127.0.0.1:5000{page}/r1"
    monkeypatch.setenv(tracking.UI_PORT_ENV, "5123")  # what `make ui PORT=5123` exports
    assert tracking.run_url(created.experiment_id) == f"http://127.0.0.1:5123{page}"
    assert main(["runs", "links", "--runs", str(tmp_path)]) == 0
    assert f"streets: http://127.0.0.1:5123{page}" in capsys.readouterr().out
    assert main(["runs", "links", "--runs", str(tmp_path), "--port", "6001"]) == 0
    assert f"http://127.0.0.1:6001{page}" in capsys.readouterr().out
    # a server's own address is kept whatever the local port
    assert tracking.run_url("7", uri="http://mlflow-host:8080/").startswith(
        "http://mlflow-host:8080/#/experiments/7")
    monkeypatch.setenv(tracking.UI_PORT_ENV, "ui")
    assert main(["runs", "links", "--runs", str(tmp_path)]) == 2
    assert "CITYSEG_UI_PORT=ui: give the port number" in capsys.readouterr().err


# Ctrl-C's default handler put back: a process started in the background (nohup, a CI
# runner) inherits SIGINT ignored, where a terminal's first run has it
OPEN = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
       "from pathlib import Path; from cityseg import tracking; " \
       "tracking.open(Path(sys.argv[1]), experiment='e')"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_store_whose_creation_is_stopped_is_not_left_half_made(tmp_path, signum):
    db, partial = tmp_path / "mlflow.db", tmp_path / ".mlflow.db.part"
    proc = subprocess.Popen([sys.executable, "-c", OPEN, str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not partial.exists():  # MLflow is creating and migrating its tables
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the store's creation never started"
        time.sleep(0.01)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0, stderr  # the signal stopped it
    assert not db.exists()  # no half-made store under the name
    tracker = tracking.open(tmp_path, experiment="e")  # the next run makes a whole one
    assert tracker.store.client.get_experiment_by_name("e") is not None
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow.db" in p.name) == [
        "mlflow.db", "mlflow.db.lock"]


def test_a_half_made_store_is_named_with_what_to_do(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as made:  # as an interrupted creation leaves it: some tables
        made.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY)")
        made.execute("CREATE INDEX index_params_run_uuid ON experiments (experiment_id)")
    with pytest.raises(StorageError, match=r"(?s)MLflow store .*mlflow.db: cannot .*: it is not "
                                           r"a whole MLflow store .*mv .*mlflow.db "
                                           r".*mlflow.db.broken"):
        tracking.open(tmp_path, experiment="e")
