"""The data path alone: decoding against the cache, and the training loader's ceiling."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from torch.utils.data import DataLoader

from cityseg.bench.baseline import BASELINE_FILE
from cityseg.config import load_experiment
from cityseg.data.cache import load_or_build
from cityseg.data.datasets import (
    CachedReader,
    DataParams,
    DiskReader,
    SegmentationDataset,
    task_lut,
)
from cityseg.data.layouts import index_dataset
from cityseg.data.transforms import build_augmentations
from cityseg.registry import BuildContext

DATA_SIZE = (256, 512)  # what the frames are cut to (the baseline's image_size)


def time_loader(dataset: SegmentationDataset, *, workers: int, epochs: int) -> float:
    """Images per second through a DataLoader (decode or cache read, task labels, augmentation)."""
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start, page cache
        break
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def decode_vs_cache(root: Path, *, workers: int) -> dict:
    """2048x1024 PNGs to 256x512 with the baseline augmentations: images/s decoding each time
    and from the cache, and the seconds the cache took to build."""
    index = index_dataset(root, splits=("train",))
    samples = index.samples["train"]
    ctx = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=DATA_SIZE)
    augment = build_augmentations(load_experiment(BASELINE_FILE).augment, ctx)
    lut = task_lut(DataParams())
    args = {"layout": index.layout, "encoding": index.encoding, "size": DATA_SIZE}
    disk = SegmentationDataset(DiskReader(samples, **args), lut=lut, transform=augment)
    uncached = time_loader(disk, workers=workers, epochs=1)
    cache_dir = Path("runs/bench/cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    decoded = load_or_build(samples, cache_dir=cache_dir, workers=max(1, workers), **args)
    build_s = time.perf_counter() - start
    cached = time_loader(SegmentationDataset(CachedReader(decoded), lut=lut, transform=augment),
                         workers=workers, epochs=3)
    return {"frames": len(samples), "workers": workers, "decode": uncached, "cache": cached,
            "cache_build_s": build_s}


def loader_ceiling(exp) -> float:
    """Images/s the training DataLoader alone delivers (cache, augmentations, workers)."""
    from cityseg.train.build import build_data
    from cityseg.train.display import NullDisplay

    splits = build_data(exp, NullDisplay())
    loader = DataLoader(splits.train, batch_size=exp.data.batch_size, shuffle=True,
                        num_workers=exp.data.workers, persistent_workers=exp.data.workers > 0)
    for _ in loader:  # warm-up epoch: worker start
        pass
    start, seen = time.perf_counter(), 0
    for _ in range(3):
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)
