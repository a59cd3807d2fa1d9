"""Writing a decode cache that cannot hurt: room checked first, plain writes, no leftovers.

`check_fits` estimates a cache's bytes (`estimate_bytes`) and refuses, with the numbers, one
that the free space of data.cache_dir, or the memory of the frames a build holds at once,
cannot take. `ArrayFile` reserves an array file in full (posix_fallocate) and writes it front
to back with plain writes, taking its CRC-32 as it goes: a disk that fills anyway is a
StorageError, never a SIGBUS on a memory map. `decode_all` decodes in worker processes with a
bounded number of frames waiting. A build's temporary folder (`temporary`) names its host and
pid; `sigterm_unwinds` makes SIGTERM unwind through the code that removes it, and
`remove_stale` removes those whose process was killed outright.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
import uuid
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cityseg.data.layouts import Sample
from cityseg.errors import ConfigError, DataError, StorageError
from cityseg.runtime.process import pid_alive

# free space a build leaves: the run still writes checkpoints and its MLflow store there
MARGIN_BYTES, MARGIN_FRACTION = 64 * 2**20, 0.05
AHEAD = 2  # frames decoded ahead per worker: enough to keep workers busy, bounded in memory
# .<fingerprint>.tmp-<host>-<pid>-<random>; before host names: .<fingerprint>.tmp-<pid>-<random>
_TEMPORARY = re.compile(r"^\.[0-9a-f]{20}\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")
log = logging.getLogger("cityseg.data.cache")  # one logger for everything about the cache


def shapes(count: int, size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The shape of each array file of a cache of `count` frames at size (H, W)."""
    height, width = size
    return {"images.npy": (count, height, width, 3), "masks.npy": (count, height, width)}


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy (version 1.0) header of a uint8 array of this shape, as numpy writes it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def estimate_bytes(count: int, size: tuple[int, int]) -> int:
    """Bytes on disk of a cache of `count` frames at size (H, W): both arrays, headers included."""
    return sum(len(npy_header(shape)) + math.prod(shape) for shape in shapes(count, size).values())


def human_bytes(count: int) -> str:
    """1.50 GiB, 20.3 MiB, 32.2 KiB."""
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def check_fits(cache_dir: Path, count: int, size: tuple[int, int], workers: int) -> None:
    """Refuse, with the numbers, a cache that the disk or the building processes' memory
    cannot hold (before anything is written)."""
    needed = estimate_bytes(count, size)
    margin = max(MARGIN_BYTES, int(needed * MARGIN_FRACTION))
    free = shutil.disk_usage(cache_dir).free
    height, width = size
    if free < needed + margin:
        raise StorageError(
            f"data.cache_dir: the decode cache of {count} frames at {height}x{width} needs "
            f"{human_bytes(needed)} in {cache_dir}, and {human_bytes(free)} is free there (a "
            f"build leaves {human_bytes(margin)} spare). Free space there, point data.cache_dir "
            f"at a larger disk, lower data.scale (or data.image_size), or set data.cache: false "
            f"to decode every epoch instead")
    frames = workers * (AHEAD + 1) if workers > 1 and count > 1 else 1
    in_flight = frames * math.prod(size) * 4  # photo (3 bytes a pixel) and mask (1)
    available = _available_memory()
    if available is not None and in_flight > available:
        raise ConfigError(
            f"data.num_workers: building the decode cache with {workers} workers holds about "
            f"{frames} frames of {height}x{width} at once ({human_bytes(in_flight)}), and "
            f"{human_bytes(available)} of memory is available; lower data.num_workers or "
            f"data.scale (or data.image_size)")


def _available_memory() -> int | None:
    """Memory the system can give without swapping (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def temporary(cache_dir: Path, key: str) -> Path:
    """Where this process builds the cache `key`: named after its host and pid."""
    return cache_dir / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(cache_dir: Path) -> list[Path]:
    """Remove the temporary folders of builds on this host whose process is gone (killed
    outright, or a power cut); each is reported. Builds still running are left alone."""
    host, removed = socket.gethostname(), []
    try:
        entries = list(cache_dir.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] not in (None, host) or pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log.warning("decode cache: removed %s, left by process %s, which is gone",
                        entry, match["pid"])
            removed.append(entry)
    return removed


@contextmanager
def sigterm_unwinds():
    """While a build runs, SIGTERM raises SystemExit(143) instead of ending the process at
    once, so the way out removes the temporary folder; a handler installed before still runs
    first (a signal can only be handled from the main thread: elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def writing(path: Path, needed: int):
    """An OSError while writing `path` (a full disk) is a StorageError naming it."""
    try:
        yield
    except OSError as err:
        raise StorageError(
            f"data.cache_dir: cannot write {path} ({err.strerror or err}); the decode cache "
            f"needs {human_bytes(needed)} in {path.parent.parent}. Free space there or point "
            f"data.cache_dir at a larger disk (the unfinished cache is removed)") from None


class ArrayFile:
    """One .npy file reserved on disk in full, then written front to back with plain writes
    (a full disk is a StorageError here, never a SIGBUS on a memory map), its CRC-32 taken
    as it is written."""

    def __init__(self, path: Path, shape: tuple[int, ...], needed: int) -> None:
        self.path, self.shape, self.needed, self.crc = path, shape, needed, 0
        header = npy_header(shape)
        with writing(path, needed):
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with writing(path, needed):
                _reserve(self.fd, len(header) + math.prod(shape))
            self.write(header)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        with writing(self.path, self.needed):
            while view:
                view = view[os.write(self.fd, view):]

    def append(self, frame: np.ndarray) -> None:
        if frame.shape != self.shape[1:] or frame.dtype != np.uint8:
            raise ValueError(f"{self.path}: frame {frame.dtype} {frame.shape}, "
                             f"expected uint8 {self.shape[1:]}")
        self.write(np.ascontiguousarray(frame))

    def finish(self) -> None:
        with writing(self.path, self.needed):
            os.fsync(self.fd)  # a delayed allocation failure shows here, not after the rename

    def close(self) -> None:
        os.close(self.fd)


def _reserve(fd: int, length: int) -> None:
    """Allocate the file's blocks now where the OS can, so a disk too small fails at once;
    elsewhere the plain writes that follow still report it."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def decode_all(samples: list[Sample], decode, workers: int, store) -> None:
    """store(photo, train_ids) for every sample in order, decoded in `workers` processes with
    at most AHEAD frames each waiting, so memory stays bounded whatever the split's size."""
    if workers <= 1 or len(samples) <= 1:
        for sample in samples:
            store(*decode(sample))
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_decoder_signals)
    waiting, ahead = deque(), workers * AHEAD
    try:
        waiting.extend(pool.submit(decode, sample) for sample in samples[:ahead])
        rest = iter(samples[ahead:])
        while waiting:
            photo, train_ids = waiting.popleft().result()
            following = next(rest, None)
            if following is not None:
                waiting.append(pool.submit(decode, following))
            store(photo, train_ids)
    except BrokenProcessPool:
        raise DataError(f"a process decoding the decode cache died (killed, or out of memory "
                        f"with {workers} of them); lower data.num_workers") from None
    finally:  # waits for the frames being decoded (cancel_futures=True can hang: cpython#116685)
        for future in waiting:
            future.cancel()
        pool.shutdown(wait=True)


def _decoder_signals() -> None:
    """Ctrl-C reaches the whole process group: decoders leave it to the main process, which
    removes the unfinished cache; SIGTERM ends them as usual."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
