"""Is a process still there? (a crashed run's, a cache build's): asked of the kernel, on this
host only."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from cityseg.errors import Stopped


def pid_alive(pid: int) -> bool:
    """True while process `pid` of this host exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def stops_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped in the block (the main thread's), as Ctrl-C raises
    KeyboardInterrupt: a command without checkpoints (predict) unwinds through the code that
    removes its unfinished files instead of ending at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
