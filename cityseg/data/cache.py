"""Decode once: resized uint8 photos and train-id masks in memory-mapped .npy files.

A split's cache lives in `<cache_dir>/<fingerprint>/`, where the fingerprint covers the file
list with sizes and modification times, the layout, the mask encoding and the target size:
change any input and a new cache is built, keep them and every later epoch and run reads
arrays instead of decoding PNGs. Masks are stored as train ids, so the binary and multiclass
tasks (and any choice of foreground classes) share one cache. A cache is built under a
temporary name and renamed when complete, so two runs building it at once are both safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cityseg.data.layouts import Encoding, Sample, read_resized

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def fingerprint(samples: list[Sample], *, layout: str, encoding: Encoding, size: tuple[int, int]) -> str:
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


def _open(path: Path) -> DecodedSplit:
    manifest = json.loads((path / MANIFEST).read_text())
    return DecodedSplit(path, manifest["fingerprint"], manifest["count"],
                        np.array(manifest["class_counts"], dtype=np.int64))


def load_or_build(samples: list[Sample], *, layout: str, encoding: Encoding, size: tuple[int, int],
                  cache_dir: Path, workers: int) -> DecodedSplit:
    """The cached split for these samples, decoding them (in `workers` processes) if needed."""
    key = fingerprint(samples, layout=layout, encoding=encoding, size=size)
    final = cache_dir / key
    if (final / MANIFEST).is_file():
        return _open(final)
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
        (tmp / MANIFEST).write_text(json.dumps({"fingerprint": key, "count": len(samples),
                                                "size": list(size), "class_counts": counts.tolist()}))
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(final)
