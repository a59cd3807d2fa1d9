"""`cityseg runs clean`: the runs of dead processes are marked FAILED (crashed), live ones are
left alone; and the heartbeat rules that tell them apart."""

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

from cityseg import tracking


def test_clean_stale_marks_only_runs_whose_process_is_gone(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    beat = {"host": socket.gethostname(), "pid": int(gone), "time": time.time()}
    dead = tracker.create_run(run_name="dead", tags={tracking.HEARTBEAT_TAG: json.dumps(beat)})
    alive = tracker.create_run(run_name="alive", tags={})
    tracker.run_id = alive
    tracker.beat()
    found = tracking.clean_stale(tmp_path, experiment="e", dry_run=True)
    assert [r.info.run_id for r, _ in found] == [dead]
    assert tracker.get_run(dead).info.status == "RUNNING"
    assert tracking.shown_status(tracker.get_run(dead)) == "CRASHED"
    (_, reason), = tracking.clean_stale(tmp_path, experiment="e")
    run = tracker.get_run(dead)
    assert run.info.status == "FAILED" and run.data.tags["crashed"] == reason
    assert f"pid {gone}" in reason and tracking.interrupted(run)
    assert tracker.get_run(alive).info.status == "RUNNING"


def fake_run(status="RUNNING", beat=None, started=0.0):
    tags = {} if beat is None else {tracking.HEARTBEAT_TAG: json.dumps(beat)}
    return SimpleNamespace(info=SimpleNamespace(status=status, start_time=started * 1000),
                           data=SimpleNamespace(tags=tags))


def test_liveness_from_heartbeats():
    here, now = socket.gethostname(), 10_000.0
    fresh = {"host": "elsewhere", "pid": 1, "time": now - 30}
    assert tracking.liveness(fake_run(beat=fresh), now=now).alive
    old = {**fresh, "time": now - tracking.STALE_AFTER_S - 1}
    state = tracking.liveness(fake_run(beat=old), now=now)
    assert not state.alive and "silent" in state.reason
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = {"host": here, "pid": dead.pid, "time": now}
    assert not tracking.liveness(fake_run(beat=gone), now=now).alive
    mine = {"host": here, "pid": os.getpid(), "time": now}
    assert tracking.liveness(fake_run(beat=mine), now=now).alive
    assert tracking.liveness(fake_run(status="FINISHED", beat=gone), now=now) is None
    assert not tracking.liveness(fake_run(started=now - 3600), now=now).alive  # never beat
