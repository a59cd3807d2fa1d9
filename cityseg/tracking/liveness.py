"""Is a RUNNING run's process still there? Its heartbeat (a thread writes it, this reads it
back), stale runs, what to resume, and `cityseg runs clean`, which marks the runs of dead
processes FAILED."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cityseg.runtime.process import pid_alive
from cityseg.tracking.store import open_store

STAGE_TAG = "cityseg.stage"  # "end" while a run's end (uploads, reports, model) runs
HEARTBEAT_TAG = "cityseg.heartbeat"  # {"host", "pid", "time"} of the process writing the run
HEARTBEAT_EVERY_S = 60.0
# a RUNNING run whose heartbeat is older than this is stale wherever it ran (on its own host,
# a dead pid says so at once)
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class Liveness:
    """Whether a RUNNING run's process is still there, and why we think so."""

    alive: bool
    reason: str  # "pid 123 on host h is gone", "heartbeat 40 s ago from pid 123 on host h", ...
    host: str | None
    pid: int | None


def liveness(run, *, now: float | None = None) -> Liveness | None:
    """Liveness of a RUNNING run from its heartbeat tag (None for runs that ended)."""
    if run.info.status != "RUNNING":
        return None
    now = time.time() if now is None else now
    try:
        beat = json.loads(run.data.tags[HEARTBEAT_TAG])
        host, pid, last = str(beat["host"]), int(beat["pid"]), float(beat["time"])
    except (KeyError, ValueError, TypeError):  # no heartbeat (yet, or an older cityseg)
        host, pid, last = None, None, run.info.start_time / 1000
    age = now - last
    where = f"pid {pid} on host {host}" if pid is not None else "no heartbeat"
    if host == socket.gethostname() and pid is not None and not pid_alive(pid):
        return Liveness(False, f"{where} is gone", host, pid)
    if age > STALE_AFTER_S:
        return Liveness(False, f"{where}: silent for {age / 60:.0f} minutes "
                               f"(stale after {STALE_AFTER_S / 60:.0f})", host, pid)
    return Liveness(True, f"heartbeat {age:.0f} s ago from {where}", host, pid)


def is_stale(run) -> bool:
    """RUNNING, but its process is gone: a crash (kill -9, OOM, power loss, lost node)."""
    state = liveness(run)
    return state is not None and not state.alive


def interrupted(run) -> bool:
    """Stopped before its end and worth continuing: KILLED (Ctrl-C, SIGTERM), crashed (a
    stale RUNNING run, or one `cityseg runs clean` marked FAILED with a `crashed` tag), or
    FAILED during the run's end (a full disk after the last epoch: training is not redone)."""
    status, tags = run.info.status, run.data.tags
    return (status == "KILLED" or is_stale(run)
            or (status == "FAILED" and ("crashed" in tags or tags.get(STAGE_TAG) == "end")))


def shown_status(run) -> str:
    """The run's status as people should read it: a stale RUNNING run is CRASHED."""
    return "CRASHED" if is_stale(run) else run.info.status


def clean_stale(root: Path, *, experiment: str | None, dry_run: bool = False,
                uri: str | None = None) -> list[tuple[object, str]]:
    """Mark every stale RUNNING run (its process is gone) FAILED with a `crashed` tag saying
    why; live runs are never touched. Returns (run, reason) of each stale run."""
    found = []
    store = open_store(root, uri)
    for run in store.search_runs(experiment=experiment,
                                 filter_string="attributes.status = 'RUNNING'"):
        state = liveness(run)
        if state is None or state.alive:
            continue
        if not dry_run:
            mark_crashed(store.client, run)
        found.append((run, state.reason))
    return found


def mark_crashed(client, run) -> str | None:
    """A stale RUNNING run marked FAILED with a `crashed` tag saying why; returns the reason,
    or None (and touches nothing) when the run is not stale."""
    state = liveness(run)
    if state is None or state.alive:
        return None
    client.set_tag(run.info.run_id, "crashed", state.reason)
    client.set_terminated(run.info.run_id, status="FAILED")
    return state.reason


class Heartbeat:
    """Refreshes a run's heartbeat tag every `every` seconds from a daemon thread."""

    def __init__(self, beat, every: float) -> None:
        self._beat, self._every = beat, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cityseg-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            with contextlib.suppress(Exception):  # a missed beat is not worth a failed run
                self._beat()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
