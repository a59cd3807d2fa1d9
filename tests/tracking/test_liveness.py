"""`cityseg runs clean`: the runs of dead processes are marked FAILED (crashed), live ones are
left alone. (The heartbeat rules themselves are tested in tests/engine/test_crash.py.)"""

import json
import socket
import subprocess
import sys
import time

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
