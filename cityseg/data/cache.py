"""Decode once: resized uint8 photos and train-id masks in memory-mapped .npy files.

A split's cache lives in `<cache_dir>/<fingerprint>/`, where the fingerprint covers the file
list with sizes and modification times, the layout, the mask encoding and the target size:
change any input and a new cache is built, keep them and every later epoch and run reads
arrays instead of decoding PNGs. Masks are stored as train ids, so the binary and multiclass
tasks (and any choice of foreground classes) share one cache. A cache is built under a
temporary name and renamed when complete, so two runs building it at once are both safe.

A cache cannot hurt a run (cache_build.py says how it is written): its size is checked
against the free space of data.cache_dir before anything is written, a disk that fills anyway
is a StorageError and never a SIGBUS, and no temporary folder outlives its build. The
manifest records its own checksum, the arrays' sizes and a CRC-32 of each array file, all
verified when a run opens the cache: damage that keeps a file's size (flipped bytes, a
broken .npy header) is found there rather than in a DataLoader worker, named, and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cityseg.data.cache_build import (
    ArrayFile,
    check_fits,
    decode_all,
    estimate_bytes,
    remove_stale,
    shapes,
    sigterm_unwinds,
    temporary,
    writing,
)
from cityseg.data.layouts import Encoding, Sample, read_resized
from cityseg.errors import StorageError

FORMAT_VERSION = 2  # of the arrays (in the fingerprint); checksums did not change them
MANIFEST_VERSION = 3  # 3: a CRC-32 per array file
MANIFEST = "manifest.json"
ARRAYS = ("images.npy", "masks.npy")
CHUNK = 16 * 2**20  # bytes read at a time when verifying
log = logging.getLogger(__name__)


class CorruptCache(Exception):
    """A cache folder whose manifest or arrays do not match what was written."""


class OutdatedCache(CorruptCache):
    """A cache folder written by an earlier cityseg, without what this one verifies."""


def fingerprint(samples: list[Sample], *, layout: str, encoding: Encoding,
                size: tuple[int, int]) -> str:
    """Hash of everything the decoded arrays depend on."""
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "layout": layout, "size": list(size),
                                   "encoding": [encoding.kind, encoding.channel_order]}).encode())
    for sample in samples:
        for path in dict.fromkeys((sample.image, sample.mask)):
            stat = path.stat()
            h.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class DecodedSplit:
    """A complete cache folder: images.npy (N, H, W, 3), masks.npy (N, H, W), manifest.json."""

    path: Path
    fingerprint: str
    count: int
    class_counts: np.ndarray  # (256,) pixels per train id (255 = ignored)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Read-only memory maps of images and masks (cheap; the OS pages data in on demand)."""
        return (np.load(self.path / "images.npy", mmap_mode="r"),
                np.load(self.path / "masks.npy", mmap_mode="r"))


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _crc32(file: Path) -> int:
    """CRC-32 of a whole file, read in chunks (zlib releases the GIL: about 1.4 GB/s)."""
    crc, buffer = 0, bytearray(CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            crc = zlib.crc32(view[:read], crc)
    return crc


def _verify(file: Path, size: int, crc: int, shape: tuple[int, ...]) -> None:
    """The array file has the size, .npy header and CRC-32 it was written with."""
    actual = file.stat().st_size
    if actual != size:
        raise CorruptCache(f"{file} has {actual} bytes, {size} were written")
    try:
        array = np.load(file, mmap_mode="r")
    except ValueError as err:
        raise CorruptCache(f"{file} has a damaged .npy header ({err})") from None
    if array.shape != shape or array.dtype != np.uint8:
        raise CorruptCache(f"{file} holds {array.dtype} {array.shape}, not uint8 {shape}")
    del array
    if _crc32(file) != crc:
        raise CorruptCache(f"{file} does not match its checksum (changed since it was written)")


def _open(path: Path) -> DecodedSplit:
    """A complete cache folder, verified: CorruptCache says what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("checksum") != _checksum(manifest):
            raise CorruptCache(f"{path / MANIFEST} does not match its checksum")
        if manifest.get("version") != MANIFEST_VERSION:
            raise OutdatedCache(f"{path} was written by an earlier cityseg, without checksums")
        expected = shapes(manifest["count"], tuple(manifest["size"]))
        for name in ARRAYS:
            _verify(path / name, manifest["bytes"][name], manifest["crc32"][name], expected[name])
        return _decoded(path, manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCache(f"{path}: unreadable ({err})") from None


def _decoded(path: Path, manifest: dict) -> DecodedSplit:
    return DecodedSplit(path, manifest["fingerprint"], manifest["count"],
                        np.array(manifest["class_counts"], dtype=np.int64))


def load_or_build(samples: list[Sample], *, layout: str, encoding: Encoding, size: tuple[int, int],
                  cache_dir: Path, workers: int,
                  before_decoding: Callable[[], None] | None = None) -> DecodedSplit:
    """The cached split for these samples, decoding them (in `workers` processes) if needed;
    `before_decoding()` is called first when they are (the wait a person should be told of)."""
    key = fingerprint(samples, layout=layout, encoding=encoding, size=size)
    final = cache_dir / key
    if final.exists():
        try:
            return _open(final)
        except OutdatedCache as err:
            log.warning("decode cache is outdated: %s; rebuilding it", err)
        except CorruptCache as err:
            log.warning("decode cache is corrupt: %s; rebuilding %s", err, final)
        shutil.rmtree(final, ignore_errors=True)
    _writable(cache_dir)
    remove_stale(cache_dir)
    check_fits(cache_dir, len(samples), size, workers)
    if before_decoding is not None:
        before_decoding()
    tmp = temporary(cache_dir, key)
    try:
        tmp.mkdir()
    except OSError as err:
        raise StorageError(f"data.cache_dir: cannot write in {cache_dir} ({err.strerror}); "
                           f"make it writable or point data.cache_dir elsewhere") from None
    decode = partial(read_resized, layout=layout, encoding=encoding, size=size)
    try:
        with sigterm_unwinds():
            manifest = _write(tmp, samples, decode=decode, workers=workers, key=key, size=size)
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return _open(final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (SystemExit, KeyboardInterrupt)):
            how = "SIGTERM" if isinstance(err, SystemExit) else "interrupted"
            log.warning("%s while building the decode cache %s: its unfinished folder was "
                        "removed (the next run builds it again)", how, final)
        raise
    return _decoded(final, manifest)


def _writable(cache_dir: Path) -> None:
    """data.cache_dir exists as a folder (created if need be): a StorageError says why not."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise StorageError(f"data.cache_dir: {cache_dir} is a file, not a folder; point "
                           f"data.cache_dir at a folder (or move the file away)")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((p for p in cache_dir.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file" if blocking else err.strerror
        raise StorageError(f"data.cache_dir: cannot create {cache_dir} ({why}); point "
                           f"data.cache_dir at a folder you can write to") from None


def _write(tmp: Path, samples: list[Sample], *, decode, workers: int, key: str,
           size: tuple[int, int]) -> dict:
    """Decode every sample into tmp's array files and write its manifest; returns it."""
    needed = estimate_bytes(len(samples), size)
    files: list[ArrayFile] = []
    counts = np.zeros(256, dtype=np.int64)
    try:
        for name, shape in shapes(len(samples), size).items():
            files.append(ArrayFile(tmp / name, shape, needed))
        images, masks = files

        def store(photo: np.ndarray, train_ids: np.ndarray) -> None:
            images.append(photo)
            masks.append(train_ids)
            np.add(counts, np.bincount(train_ids.ravel(), minlength=256), out=counts)

        decode_all(samples, decode, workers, store)
        for file in files:
            file.finish()
    finally:
        for file in files:
            file.close()
    manifest = {"version": MANIFEST_VERSION, "fingerprint": key, "count": len(samples),
                "size": list(size), "class_counts": counts.tolist(),
                "bytes": {f.path.name: f.path.stat().st_size for f in files},
                "crc32": {f.path.name: f.crc for f in files}}
    with writing(tmp / MANIFEST, needed):
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "checksum": _checksum(manifest)}))
    return manifest


