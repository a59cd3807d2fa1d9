"""A tracking server that stops answering: how long it has been silent against the run's limit
(tracking.outage_minutes), the error past it, and the waits for it, which a signal cuts short.
(What the run logs meanwhile is kept by the Outbox, outbox.py.)

Only a server has outages: a local SQLite store is there, or it is a StorageError. Nothing here
draws from the global random generators, whose states the training's checkpoints carry.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

from cityseg.errors import StorageError

FIRST_CONTACT_S = 30.0  # a server that never answered is most likely a wrong URI: do not wait long
MAX_PAUSE_S = 5.0  # between tries: a server that is back is found within seconds
SLICE_S = 0.1  # waits sleep in slices, so that a signal (it sets a flag) ends them at once
# what requests and urllib3 say (through MLflow) when a server is down, unreachable or overloaded
_UNREACHABLE = ("connection refused", "failed to establish a new connection",
                "max retries exceeded", "connection aborted", "connection reset",
                "remote end closed", "broken pipe",
                "remotedisconnected", "timed out", "bad gateway", "service unavailable",
                "gateway timeout", "too many requests", "error code 429", "error code 502",
                "error code 503", "error code 504", "name or service not known",
                "temporary failure in name resolution", "response ended prematurely",
                "connection broken")  # a server killed while it answered (IncompleteRead)
_JITTER = random.Random()  # its own generator: the global ones belong to the training


class TrackingUnavailable(StorageError):
    """The tracking server did not answer for tracking.outage_minutes, or a signal ended the
    wait for it; the message says what was kept and how to finish the run."""


class ServerSilent(Exception):
    """A single try found the tracking server silent (no waiting: the caller keeps the write)."""


def unreachable(err: BaseException) -> bool:
    """The error says the server did not answer (or is overloaded), not that it refused."""
    text = str(err).lower()
    return any(sign in text for sign in _UNREACHABLE)


def _short(err: BaseException) -> str:
    """'Connection refused' out of MLflow's paragraph about a failed request."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text) or re.search(
        r"(too many \d+ error responses|Read timed out|error code \d+)", text)
    return found.group(1).strip() if found else text.splitlines()[0][:160]


# ---------------------------------------------------------------- signals end every wait

_signalled = 0  # set from a signal handler, read by every wait


def interrupt_waits(signum: int) -> None:
    """From a signal handler: every wait for a silent server ends within a slice."""
    global _signalled
    _signalled = signum


def clear_signal() -> None:
    """A new session waits again (an earlier run of this process may have been signalled)."""
    global _signalled
    _signalled = 0


def signalled() -> bool:
    return bool(_signalled)


def signal_name() -> str | None:
    return signal.Signals(_signalled).name if _signalled else None


def pause(seconds: float) -> bool:
    """Sleep `seconds` in slices; False at once when a signal came (interrupt_waits)."""
    end = time.monotonic() + seconds
    with signals_end_waits():
        while not _signalled:
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(SLICE_S, left))
    return False


@contextlib.contextmanager
def signals_end_waits() -> Iterator[None]:
    """SIGINT and SIGTERM end the waits of the block instead of the process (main thread only:
    elsewhere a signal cannot be caught, and the runner's handler covers training)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: interrupt_waits(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- how long the server is silent

_on_limit: list[Callable[[], None]] = []  # what stops training when the limit passes


def outage_limit_passed() -> None:
    """The server stayed silent past the limit: stop training (the on_outage_limit hooks)."""
    for stop in list(_on_limit):
        stop()


@contextlib.contextmanager
def on_outage_limit(stop: Callable[[], None]) -> Iterator[None]:
    """Call `stop()` (from another thread) when a run's server stays silent past its limit, so
    training stops at its next step with a checkpoint instead of at the next epoch's end."""
    _on_limit.append(stop)
    try:
        yield
    finally:
        _on_limit.remove(stop)


class Outage:
    """How long the tracking server at `url` has not answered, against `limit_s`."""

    def __init__(self, url: str, limit_s: float) -> None:
        self.url, self.limit_s = url, limit_s
        self.since: float | None = None  # monotonic time of the first unanswered try
        self.tries = 0
        self.last_error = ""
        self.answered = False  # never: a wrong URI, more likely than an outage
        self.last_silence_s = 0.0  # how long the last outage lasted, once it is over

    def silent(self, started: float, err: BaseException) -> None:
        """A try that began at `started` (time.monotonic) got no answer."""
        if self.since is None:
            self.since = started
        self.tries += 1
        self.last_error = _short(err)

    def answer(self) -> None:
        if self.since is not None:
            self.last_silence_s = self.lasted()
        self.since, self.tries, self.answered = None, 0, True

    @property
    def limit(self) -> float:
        return self.limit_s if self.answered else min(self.limit_s, FIRST_CONTACT_S)

    def lasted(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def left(self) -> float:
        return self.limit - self.lasted()

    def expired(self) -> bool:
        return self.since is not None and self.left() <= 0

    def next_pause(self) -> float:
        """Seconds before the next try: 0.5, 1, 2, 4, then every MAX_PAUSE_S, within the limit."""
        backoff = min(MAX_PAUSE_S, 0.5 * 2 ** min(self.tries - 1, 4)) * (1 + _JITTER.random() / 5)
        return max(0.0, min(backoff, self.left()))

    def wait(self) -> None:
        """Pause before trying again; TrackingUnavailable past the limit or after a signal."""
        if self.left() <= 0 or not pause(self.next_pause()):
            raise self.unavailable()

    def describe(self) -> str:
        """'has not answered for 12 s (tracking.outage_minutes: 0.2; last error: ...)'"""
        lasted = self.lasted() if self.since is not None else self.last_silence_s
        took = f"{lasted / 60:.1f} minutes" if lasted >= 90 else f"{lasted:.0f} s"
        limit = (f"tracking.outage_minutes: {self.limit_s / 60:g}" if self.answered else
                 f"it never answered this process; {FIRST_CONTACT_S:.0f} s are allowed for that")
        return f"has not answered for {took} ({limit}; last error: {self.last_error})"

    def unavailable(self) -> TrackingUnavailable:
        what = f"the MLflow tracking server at {self.url} {self.describe()}"
        if _signalled:
            return TrackingUnavailable(f"{signal_name()} ended the wait: {what}")
        if not self.answered:
            what += "; start it, or check --tracking-uri, tracking.uri and MLFLOW_TRACKING_URI"
        return TrackingUnavailable(what)
