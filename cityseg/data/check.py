"""`cityseg data check`: read every sample of a dataset and report what is there and what is
broken."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from cityseg.data.cityscapes import (
    DEFAULT_FOREGROUND,
    IGNORE_INDEX,
    class_frequencies,
    foreground_stats,
)
from cityseg.data.layouts import Encoding, Sample, index_dataset, read_sample
from cityseg.errors import DataError


def _inspect(sample: Sample, *, layout: str,
             encoding: Encoding) -> tuple[str, np.ndarray | None, str | None]:
    """(image size 'WxH', pixels per train id, problem) of one sample."""
    try:
        photo, train_ids = read_sample(sample, layout=layout, encoding=encoding)
    except DataError as err:
        return "", None, str(err)
    return f"{photo.shape[1]}x{photo.shape[0]}", np.bincount(train_ids.ravel(), minlength=256), None


def check_dataset(root: Path, *, layout: str = "auto", splits: tuple[str, ...] = ("train", "val"),
                  foreground: tuple[str, ...] = DEFAULT_FOREGROUND, workers: int = 0) -> dict:
    """A JSON-ready report: layout, encoding, counts, sizes, class frequencies, broken samples."""
    index = index_dataset(root, layout=layout, splits=splits)
    inspect = partial(_inspect, layout=index.layout, encoding=index.encoding)
    workers = workers or min(8, os.cpu_count() or 1)
    report: dict = {
        "root": str(root), "layout": index.layout, "layout_how": index.layout_how,
        "mask_encoding": {"kind": index.encoding.kind,
                          "channel_order": index.encoding.channel_order,
                          "how": index.encoding.how},
        "splits": {}, "broken": [{"path": str(p.path), "reason": p.reason} for p in index.problems],
    }
    train_counts = np.zeros(256, dtype=np.int64)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for split in splits:
            counts, sizes = np.zeros(256, dtype=np.int64), Counter()
            for sample, (size, pixels, problem) in zip(
                    index.samples[split], pool.map(inspect, index.samples[split], chunksize=2),
                    strict=True):
                if problem is not None:  # DataError texts start with the file they are about
                    path = next((p for p in (sample.image, sample.mask)
                                 if problem.startswith(f"{p}:")), sample.mask)
                    reason = problem.removeprefix(f"{path}: ")
                    report["broken"].append({"path": str(path), "reason": reason})
                    continue
                sizes[size] += 1
                counts += pixels
            fraction, _ = foreground_stats(counts, foreground)
            report["splits"][split] = {"images": len(index.samples[split]),
                                       "image_sizes": dict(sizes),
                                       "foreground_fraction": fraction}
            if split == splits[0]:
                train_counts = counts
    fraction, ratio = foreground_stats(train_counts, foreground)
    report["class_frequencies"] = {  # of the labelled pixels of the first split
        name: entry["frequency"]
        for name, entry in class_frequencies(train_counts)["classes"].items()}
    report["ignored_fraction"] = float(train_counts[IGNORE_INDEX] / max(1, train_counts.sum()))
    report["foreground"] = list(foreground)
    report["foreground_fraction"] = fraction
    report["suggested_pos_weight"] = round(ratio, 2) if np.isfinite(ratio) else None
    return report
