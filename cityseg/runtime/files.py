"""A file written whole or not at all: written beside its name, renamed once complete.

Checkpoints, videos, benchmark zips and a run's spooled records go through `written_whole`,
so a kill, a crash or a full disk never leaves half a file under the name a reader opens, and
a file already there stays as it was until the new one is complete.

`sqlite_uri` and `sqlite_path` are the one place a database file becomes an address (MLflow's
store, Optuna's study) and back.
"""

from __future__ import annotations

import os
import re
import urllib.parse
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
    partial.unlink(missing_ok=True)  # a leftover, or a link planted there: never written through
    try:
        yield partial
        if fsync:
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


SQLITE = "sqlite:///"
_URL_SPECIAL = re.compile(r"[%?#]")  # a query, a fragment, an escape to SQLAlchemy


def sqlite_uri(path: Path | str) -> str:
    """The SQLAlchemy address of the SQLite file `path`: `?`, `#` and `%` in it escaped, so that
    a folder named `runs#1?mode=ro` is a folder, not a query on another file."""
    return SQLITE + _URL_SPECIAL.sub(lambda m: f"%{ord(m.group()):02X}", str(path))


def sqlite_path(uri: str) -> Path:
    """The file a `sqlite:///` address names (its query, if any, left off)."""
    return Path(urllib.parse.unquote(uri.removeprefix(SQLITE).partition("?")[0]))
