"""A file written whole or not at all: written beside its name, renamed once complete.

Checkpoints, videos, benchmark zips and a run's spooled records go through `written_whole`,
so a kill, a crash or a full disk never leaves half a file under the name a reader opens, and
a file already there stays as it was until the new one is complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(path: Path) -> Path:
    """Where `path` is written until it is complete (hidden, never matched by *.pt or *.mp4)."""
    return path.with_name(f".{path.name}.part")


@contextmanager
def written_whole(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed to `path` when the block
    ends normally (after an fsync when asked: the bytes are on disk before the name moves),
    removed when it raises."""
    partial = partial_path(path)
    try:
        yield partial
        if fsync:
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
