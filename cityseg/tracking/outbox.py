"""A run's writes to a tracking server while it may be silent: sent at once while it answers,
kept in order (training goes on) while it does not, sent by a background thread when it answers
again, and written beside the run's checkpoints for `--resume` when it does not in time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cityseg.runtime.files import written_whole
from cityseg.tracking.outage import (
    SLICE_S,
    Outage,
    ServerSilent,
    outage_limit_passed,
    pause,
    signalled,
    signals_end_waits,
)
from cityseg.tracking.records import IMAGES, Record

END_GRACE_S = 5.0  # a run stopped or failed tries this long to tell the server, not the limit


class Outbox:
    """A run's writes to a tracking server, in order. While it answers they go at once; once
    it is silent they are kept and training goes on, while a background thread tries again
    and sends them when it answers. Past the limit that thread gives up: the on_outage_limit
    hooks stop training, and the next write raises TrackingUnavailable.

    deliver(record) and probe() make one try each and raise ServerSilent when unanswered."""

    def __init__(self, *, deliver: Callable[[Record], None], probe: Callable[[], None],
                 outage: Outage) -> None:
        self._deliver, self._probe, self.outage = deliver, probe, outage
        self._lock = threading.Lock()
        self._queue: list[Record] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self.refused: BaseException | None = None  # the server answered a kept write: no
        self.gave_up = False
        self._together = 0  # inside together(): the limit's stop waits for the block's end

    @property
    def silent(self) -> bool:
        """The server did not answer, and the thread that tries again is at it."""
        return self._thread is not None or bool(self._queue)

    def put(self, record: Record) -> None:
        """Send `record`, or keep it behind the ones already kept."""
        with self._lock:
            keep = self.silent
            # an upload kept already sends the file as it is then: once is enough
            if keep and not (record[0] == "file" and record in self._queue):
                self._queue.append(record)
        if not keep:
            started = time.monotonic()
            try:
                self._deliver(record)
                self.outage.answer()
            except ServerSilent as err:
                self.outage.silent(started, err)
                with self._lock:
                    self._queue.append(record)
                    self._start()
        self._raise_trouble()

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Writes that belong together (an epoch's metrics and images): all are kept, even when
        the limit passes among them, and the stop it brings comes after the last, so a resume
        that starts after that epoch finds none of them missing."""
        self._together += 1
        try:
            yield
        finally:
            self._together -= 1
        self._raise_trouble()

    def put_kept(self, record: Record) -> None:
        """Keep `record` behind the others without trying to send it (the run's end)."""
        with self._lock:
            self._queue.append(record)

    @property
    def kept(self) -> int:
        """How many records spool() would write."""
        return sum(1 for record in self._queue if record[0] != "file")

    def beat(self, send: Callable[[], None]) -> None:
        """A heartbeat, sent only while the server answers (a kept one would say nothing)."""
        if self.silent:
            return
        started = time.monotonic()
        try:
            send()
            self.outage.answer()
        except ServerSilent as err:
            self.outage.silent(started, err)
            with self._lock:
                self._start()

    def _raise_trouble(self) -> None:
        refused, self.refused = self.refused, None
        if refused is not None:
            raise refused
        if self.gave_up and not self._together:
            raise self.outage.unavailable()

    def _start(self) -> None:
        """(Under the lock.) The thread that tries again, if it is not running."""
        if self._thread is None and not self.gave_up and not self._closing:
            self._thread = threading.Thread(target=self._retry, name="cityseg-outbox",
                                            daemon=True)
            self._thread.start()

    def _retry(self) -> None:
        """Try the oldest kept write (or a heartbeat) until the server answers and all are
        sent, the limit passes (give up), a signal comes, or the session closes."""
        try:
            while not self._closing:
                if self.outage.expired():
                    self._give_up()
                    return
                with self._lock:
                    record = self._queue[0] if self._queue else None
                started = time.monotonic()
                try:
                    if record is not None:
                        self._deliver(record)
                    else:
                        self._probe()
                except ServerSilent as err:
                    self.outage.silent(started, err)
                    if not pause(self.outage.next_pause()):
                        return
                    continue
                except Exception as err:  # noqa: BLE001  (answered, but refused: the caller's)
                    self.refused = err
                self.outage.answer()
                with self._lock:
                    if record is not None:
                        self._queue.pop(0)
                    if not self._queue:
                        self._thread = None
                        return
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _give_up(self) -> None:
        self.gave_up = True
        outage_limit_passed()

    def settle(self) -> bool:
        """Wait until every kept write is sent: False when the thread gave up, a signal came,
        or nothing tries any more."""
        if not self.silent:
            return True
        with signals_end_waits():
            while True:
                with self._lock:
                    if not self._queue and self._thread is None:
                        return True
                    trying = self._thread is not None
                if self.gave_up or signalled() or not trying:
                    return False
                time.sleep(SLICE_S)

    def close(self, *, wait: bool) -> bool:
        """The session's end: wait for the server within the limit (`wait`: a finished run),
        else for END_GRACE_S at most; True when nothing is left unsent."""
        if wait:
            self.settle()
        self._closing = True
        thread = self._thread
        if thread is not None:
            thread.join(timeout=2 * SLICE_S)  # a try in flight may hang: leave it
            if thread.is_alive():
                return not self._queue
        grace = time.monotonic() + (0.0 if wait or self.gave_up else END_GRACE_S)
        while self._queue:  # the last tries, here
            started = time.monotonic()
            try:
                self._deliver(self._queue[0])
            except ServerSilent as err:
                self.outage.silent(started, err)
                if time.monotonic() >= grace or not pause(self.outage.next_pause()):
                    return False
                continue
            except Exception as err:  # noqa: BLE001  (refused: the run's end goes on)
                self.refused = err
            self.outage.answer()
            self._queue.pop(0)
        return True

    # ------------------------------------------------------------ on disk, for --resume

    def spool(self, folder: Path) -> int:
        """Write the kept records (uploads aside: the resumed run uploads its checkpoints
        again) to `folder`, for the run's resume to send first; how many were kept."""
        with self._lock:
            kept = [r for r in self._queue if r[0] != "file"]
        if not kept:
            return 0
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for n, (kind, *payload) in enumerate(kept):
            if kind in IMAGES:
                np.save(folder / f"{n:05d}.npy", payload[0])
                payload = [f"{n:05d}.npy", *payload[1:]]
            lines.append(json.dumps({"kind": kind, "payload": payload}, default=_plain))
        with written_whole(folder / "records.jsonl") as part:
            part.write_text("\n".join(lines) + "\n")
        return len(kept)


def _plain(value):
    """JSON for what json does not know: NumPy numbers in a table, paths."""
    return value.item() if hasattr(value, "item") else str(value)


def unspooled(folder: Path) -> list[Record]:
    """The records a run kept on disk (Outbox.spool), in order; none when there is no folder."""
    path = folder / "records.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        kind, payload = entry["kind"], entry["payload"]
        if kind in IMAGES:
            payload = [np.load(folder / payload[0]), *payload[1:]]
        records.append((kind, *payload))
    return records


def forget(folder: Path) -> None:
    """The kept records were sent: the folder goes."""
    shutil.rmtree(folder, ignore_errors=True)
