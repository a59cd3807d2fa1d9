"""Decode once: resized uint8 photos and train-id masks in memory-mapped .npy files.

A split's cache lives in `<cache_dir>/<fingerprint>/`, where the fingerprint covers the file
list with sizes and modification times, the layout, the mask encoding and the target size:
change any input and a new cache is built, keep them and every later epoch and run reads
arrays instead of decoding PNGs. Masks are stored as train ids, so the binary and multiclass
tasks (and any choice of foreground classes) share one cache. A cache is built under a
temporary name and renamed when complete, so two runs building it at once are both safe. Its
manifest records the arrays' sizes and a checksum of itself: a cache truncated or damaged
later (a full disk, a crash while copying it) is detected, named, and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cityseg.data.layouts import Encoding, Sample, read_resized

FORMAT_VERSION = 2  # 2: the manifest holds array sizes and its own checksum
MANIFEST = "manifest.json"
ARRAYS = ("images.npy", "masks.npy")
log = logging.getLogger(__name__)


class CorruptCache(Exception):
    """A cache folder whose manifest or arrays do not match what was written."""


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


def _open(path: Path) -> DecodedSplit:
    """A complete cache folder, checked: CorruptCache says what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("checksum") != _checksum(manifest):
            raise CorruptCache(f"{path / MANIFEST} does not match its checksum")
        for name in ARRAYS:
            size, expected = (path / name).stat().st_size, manifest["bytes"][name]
            if size != expected:
                raise CorruptCache(f"{path / name} has {size} bytes, {expected} were written")
        return DecodedSplit(path, manifest["fingerprint"], manifest["count"],
                            np.array(manifest["class_counts"], dtype=np.int64))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCache(f"{path}: unreadable ({err})") from None


def load_or_build(samples: list[Sample], *, layout: str, encoding: Encoding, size: tuple[int, int],
                  cache_dir: Path, workers: int) -> DecodedSplit:
    """The cached split for these samples, decoding them (in `workers` processes) if needed."""
    key = fingerprint(samples, layout=layout, encoding=encoding, size=size)
    final = cache_dir / key
    if final.exists():
        try:
            return _open(final)
        except CorruptCache as err:
            log.warning("decode cache is corrupt: %s; rebuilding %s", err, final)
            shutil.rmtree(final, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        height, width = size
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(samples), height, width, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(samples), height, width))
        counts = np.zeros(256, dtype=np.int64)
        decode = partial(read_resized, layout=layout, encoding=encoding, size=size)
        if workers > 1 and len(samples) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                decoded = pool.map(decode, samples, chunksize=4)
                for i, (photo, train_ids) in enumerate(decoded):
                    images[i], masks[i] = photo, train_ids
                    counts += np.bincount(train_ids.ravel(), minlength=256)
        else:
            for i, sample in enumerate(samples):
                images[i], masks[i] = decode(sample)
                counts += np.bincount(masks[i].ravel(), minlength=256)
        images.flush()
        masks.flush()
        del images, masks
        manifest = {"fingerprint": key, "count": len(samples), "size": list(size),
                    "class_counts": counts.tolist(),
                    "bytes": {name: (tmp / name).stat().st_size for name in ARRAYS}}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "checksum": _checksum(manifest)}))
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(final)
