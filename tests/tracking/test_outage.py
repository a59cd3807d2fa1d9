"""A silent tracking server: writes are kept in order and sent when it answers, waits end at
the limit or at a signal, kept records survive on disk, and no retry draws from the training's
random generators. (Real servers killed and restarted: tests/faults/test_tracking.py.)"""

import random
import signal
import threading
import time

import numpy as np
import pytest

from cityseg.tracking import outage as outages
from cityseg.tracking.outage import Outage, ServerSilent, TrackingUnavailable
from cityseg.tracking.outbox import Outbox, forget, unspooled
from cityseg.tracking.store import RetryingClient

REFUSED = ("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception "
           "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded (Caused by "
           "NewConnectionError(\"...: Failed to establish a new connection: [Errno 111] "
           "Connection refused\"))")


@pytest.fixture(autouse=True)
def _no_signal_left():
    outages.clear_signal()
    yield
    outages.clear_signal()


class Server:
    """Takes records while up; silent while down."""

    def __init__(self) -> None:
        self.up, self.got = True, []

    def deliver(self, record) -> None:
        if not self.up:
            raise ServerSilent(REFUSED)
        self.got.append(record)

    def probe(self) -> None:
        self.deliver(("tags", {"beat": "1"}))


def answered(limit_s: float) -> Outage:
    outage = Outage("http://127.0.0.1:9", limit_s)
    outage.answer()  # it answered once: the full limit applies
    return outage


def test_writes_kept_while_the_server_is_silent_go_in_order_once_it_answers():
    server, outage = Server(), answered(60)
    box = Outbox(deliver=server.deliver, probe=server.probe, outage=outage)
    box.put(("metrics", {"a": 1.0}, 1, 0))
    server.up = False
    for step in (2, 3, 4):
        box.put(("metrics", {"a": float(step)}, step, 0))  # kept: training goes on
    assert box.silent and box.kept == 3
    assert [r[2] for r in server.got] == [1]
    server.up = True
    assert box.settle()
    assert [r[2] for r in server.got] == [1, 2, 3, 4] and not box.silent
    assert outage.since is None and "has not answered for" in outage.describe()


def test_past_the_limit_the_outbox_gives_up_stops_training_and_the_next_write_says_so():
    server, stopped = Server(), []
    box = Outbox(deliver=server.deliver, probe=server.probe, outage=answered(0.3))
    server.up = False
    with outages.on_outage_limit(lambda: stopped.append(True)):
        box.put(("tags", {"k": "v"}))
        assert not box.settle()  # returns once it gave up
    assert box.gave_up and stopped == [True]
    with pytest.raises(TrackingUnavailable, match=r"http://127.0.0.1:9 has not answered for "
                                                  r"\d+ s \(tracking.outage_minutes: 0.005"):
        box.put(("tags", {"k": "w"}))
    assert not box.close(wait=False) and box.kept == 2


def test_a_server_killed_while_it_answers_is_silent_not_a_refusal():
    cut = ("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with "
           "exception ('Connection broken: IncompleteRead(0 bytes read, 2 more expected)', "
           "IncompleteRead(0 bytes read, 2 more expected))")
    assert outages.unreachable(RuntimeError(cut)) and outages.unreachable(RuntimeError(REFUSED))
    assert not outages.unreachable(RuntimeError("RESOURCE_DOES_NOT_EXIST: run 'x' not found"))


def test_writes_that_belong_together_are_all_kept_when_the_limit_passes_among_them():
    """An epoch's end (its metrics, then its images): a give-up after the first write still
    keeps the others, and the stop comes once the last is kept."""
    server = Server()
    box = Outbox(deliver=server.deliver, probe=server.probe, outage=answered(0.3))
    server.up = False
    with outages.on_outage_limit(lambda: None):
        box.put(("tags", {"k": "v"}))
        assert not box.settle() and box.gave_up  # the limit passed
    with pytest.raises(TrackingUnavailable, match="has not answered"), box.together():
        box.put(("metrics", {"val/dice": 0.5}, 10, 0))
        box.put(("image", np.zeros((2, 2, 3), np.uint8), "samples/epoch_010.png"))
        assert box.kept == 3  # nothing raised inside the block
    assert [r[0] for r in box._queue] == ["tags", "metrics", "image"]


def test_a_heartbeat_to_a_silent_server_starts_the_retries_and_never_waits():
    server, stopped = Server(), []
    box = Outbox(deliver=server.deliver, probe=server.probe, outage=answered(0.3))
    server.up = False
    with outages.on_outage_limit(lambda: stopped.append(True)):
        box.beat(server.probe)  # no record kept, but the silence is timed from here
        assert box.silent and box.kept == 0
        box.settle()
    assert stopped == [True]


def test_kept_records_survive_on_disk_in_order(tmp_path):
    server = Server()
    box = Outbox(deliver=server.deliver, probe=server.probe, outage=answered(60))
    server.up = False
    panel = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    records = [("metrics", {"val/dice": 0.5}, 3, 1234), ("image", panel, "samples/e3.png"),
               ("file", "/x/last.pt", "checkpoints"),
               ("table", {"score": [np.float32(0.25)]}, "t.json"), ("tags", {"k": "v"})]
    for record in records:
        box.put(record)
    assert box.close(wait=False) is False
    folder = tmp_path / "unsent"
    assert box.spool(folder) == 4  # the upload is redone by the resumed run instead
    back = unspooled(folder)
    assert [r[0] for r in back] == ["metrics", "image", "table", "tags"]
    assert back[0] == ("metrics", {"val/dice": 0.5}, 3, 1234)
    assert np.array_equal(back[1][1], panel) and back[2][1] == {"score": [0.25]}
    forget(folder)
    assert not folder.exists() and unspooled(folder) == []


class Client:
    """An MlflowClient whose server is down for the first `silent` calls."""

    def __init__(self, silent: int) -> None:
        self.silent, self.calls = silent, 0

    def get_run(self, run_id):
        self.calls += 1
        if self.calls <= self.silent:
            raise RuntimeError(REFUSED)
        return run_id


def test_calls_wait_for_a_silent_server_within_the_limit_without_the_global_random():
    before = random.getstate()
    client = RetryingClient(Client(silent=2), "http://127.0.0.1:9", answered(60))
    assert client.get_run("r") == "r"
    assert random.getstate() == before  # the training's generator is not drawn from
    with pytest.raises(TrackingUnavailable, match="has not answered"):
        RetryingClient(Client(silent=10**6), "s", answered(0.5)).get_run("r")
    with pytest.raises(ServerSilent):
        RetryingClient(Client(silent=1), "s", answered(60)).single().get_run("r")


def test_a_server_that_never_answered_is_given_seconds_and_named(monkeypatch):
    monkeypatch.setattr(outages, "FIRST_CONTACT_S", 0.3)
    with pytest.raises(TrackingUnavailable, match="never answered .* check --tracking-uri"):
        RetryingClient(Client(silent=10**6), "s", Outage("http://h:1", 600)).get_run("r")


def test_a_signal_ends_a_wait_for_a_silent_server():
    client = RetryingClient(Client(silent=10**6), "s", answered(600))
    timer = threading.Timer(0.3, outages.interrupt_waits, [signal.SIGTERM])
    timer.start()
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="SIGTERM ended the wait"):
        client.get_run("r")
    assert time.monotonic() - started < 60  # not the limit (600 s)
