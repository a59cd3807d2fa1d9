"""Is a process still there? (a crashed run's, a cache build's): asked of the kernel, on this
host only."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process `pid` of this host exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
