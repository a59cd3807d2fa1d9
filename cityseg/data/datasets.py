"""Dataset registry entries: where samples come from (the `data:` section and the index of a
dataset's files) and the two splits a run trains and validates on, each read from the decode
cache or from disk. How a sample is read and becomes tensors is loader.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator
from torchvision.transforms import v2

from cityseg.data import synthetic
from cityseg.data.cache import fingerprint, load_or_build
from cityseg.data.cityscapes import DEFAULT_FOREGROUND, TRAIN_CLASSES
from cityseg.data.layouts import DatasetIndex, index_dataset
from cityseg.data.loader import (
    CachedReader,
    DiskReader,
    SegmentationDataset,
    loader_workers,
)
from cityseg.data.tasks import TASKS
from cityseg.errors import ConfigError, DataError
from cityseg.registry import DATASETS, BuildContext, Params

TrainClass = Literal[TRAIN_CLASSES]  # type: ignore[valid-type]
# The longest image side accepted anywhere (image_size, scale, source_size). Full Cityscapes
# frames are 1024x2048 and twice that is 2048x4096; 8192 admits 4x and 8K camera frames too,
# while the largest frame it allows (8192x8192: 256 MiB decoded, with its mask) can still be
# cached and trained on. A side beyond it is a slip (an extra zero) that would otherwise end
# in an OOM kill or a terabyte sparse file.
MAX_SIDE = 8192


def check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    """A (height, width) whose sides are positive and at most MAX_SIDE."""
    if size is not None and min(size) < 1:
        raise ValueError("sizes must be positive")
    if size is not None and max(size) > MAX_SIDE:
        raise ValueError(f"each side must be at most {MAX_SIDE} pixels (full Cityscapes is "
                         f"[1024, 2048])")
    return size


class DataParams(Params):
    """Fields every dataset shares: task, sizes, loading and caching."""

    task: Literal[tuple(TASKS)] = Field(  # type: ignore[valid-type]
        "binary", description="; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
        + "; void pixels are ignored in every task")
    foreground: list[TrainClass] = Field(
        list(DEFAULT_FOREGROUND), min_length=1,
        description="Cityscapes train classes that count as foreground in the binary task")
    image_size: tuple[int, int] = Field(
        (256, 512), description="(height, width) the model trains on: frames are resized to it, "
                                "or cropped to it when data.scale keeps them larger")
    scale: tuple[int, int] | None = Field(
        None, description="(height, width) frames are kept at in the decode cache and validated "
                          "at, e.g. [512, 1024] for half-scale Cityscapes; unset: image_size")
    batch_size: int = Field(8, ge=1, description="images per training and validation batch, "
                                                 "over all processes (torchrun): each of N "
                                                 "processes takes batch_size / N")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader (and cache-building) worker processes; auto: "
                                  "this process's share of the CPUs it may use (shared by the "
                                  "torchrun ranks and `sweep --jobs` workers of the machine), "
                                  "less one for the training loop, at most 8")
    cache: bool = Field(True, description="decode and resize every image once into cache_dir and "
                                          "read arrays afterwards")
    cache_dir: Path = Field(Path("runs/cache"), description="where decoded arrays are kept")
    augment_on: Literal["auto", "workers", "device"] = Field(
        "auto", description="where training augmentations run: workers (torchvision, per "
                            "sample, in the DataLoader's processes), device (the loader delivers "
                            "cached uint8 frames and each sample's random parameters; kornia "
                            "applies them batched on the training device); auto: device on "
                            "CUDA when every augmentation has a batched form, else workers")

    @field_validator("image_size", "scale")
    @classmethod
    def _sane(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        return check_size(size)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the frames as cached and validated: data.scale, else image_size."""
        return tuple(self.scale or self.image_size)

    @property
    def workers(self) -> int:
        """data.num_workers as a count (auto resolved for this process)."""
        return loader_workers(self.num_workers)

    @property
    def training_split(self) -> str:
        """The split a run trains on."""
        return "train"

    @property
    def validation_split(self) -> str:
        """The split a run validates on."""
        return "val"

    def index(self, splits: tuple[str, ...]) -> DatasetIndex:
        """The samples of the splits, found where and as this dataset keeps its files."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its samples are")


class CityscapesParams(DataParams):
    """Cityscapes in any of its usual copies: official, folders (Kaggle) or pairs (pix2pix)."""

    root: Path = Field(Path("data/cityscapes"), description="folder holding the dataset")
    layout: Literal["auto", "official", "folders", "pairs"] = Field(
        "auto", description="auto (detected from the folder), official, folders or pairs")
    train_split: str = Field("train", description="split used for training")
    val_split: str = Field("val", description="split used for validation")

    def index(self, splits: tuple[str, ...]) -> DatasetIndex:
        return index_dataset(self.root, layout=self.layout, splits=splits)

    @property
    def training_split(self) -> str:
        return self.train_split

    @property
    def validation_split(self) -> str:
        return self.val_split


class SyntheticParams(DataParams):
    """Procedural street scenes, generated on first use in the official layout."""

    root: Path = Field(Path("runs/data/synthetic"), description="where the scenes are written")
    num_train: int = Field(256, ge=1, description="training scenes")
    num_val: int = Field(64, ge=1, description="validation scenes")
    source_size: tuple[int, int] = Field(
        (128, 256), description="(height, width) of the written PNGs")
    seed: int = Field(0, description="generator seed; the same seed writes the same scenes")

    @field_validator("source_size")
    @classmethod
    def _sane_source(cls, size: tuple[int, int]) -> tuple[int, int]:
        return check_size(size)  # a name of its own: one named _sane would replace DataParams'

    def index(self, splits: tuple[str, ...]) -> DatasetIndex:
        return index_dataset(self.root, layout="official", splits=splits)  # as it is written


def task_lut(p: DataParams) -> np.ndarray:
    """Train id -> label of the configured task (255 = ignore)."""
    return TASKS[p.task].lut(p.foreground)


@dataclass
class DataSplits:
    train: SegmentationDataset
    val: SegmentationDataset
    index: DatasetIndex
    fingerprints: dict[str, str] = field(default_factory=dict)  # per split
    frames: dict[str, list[str]] = field(default_factory=dict)  # "train"/"val": frame_names

    def train_class_counts(self) -> np.ndarray:
        """Pixels per train id in the (resized) training split."""
        return self.train.reader.class_counts()


def reader_for(p: DataParams, index: DatasetIndex, split: str, *,
               before_decoding: Callable[[], None] | None = None
               ) -> tuple[DiskReader | CachedReader, str]:
    """A reader of the split at data.scale (else image_size; through the cache if enabled),
    and its fingerprint; `before_decoding()` as the cache's `load_or_build` calls it."""
    samples = index.samples[split]
    args = {"layout": index.layout, "encoding": index.encoding, "size": p.frame_size}
    if p.cache:
        decoded = load_or_build(samples, cache_dir=p.cache_dir, workers=p.workers,
                                before_decoding=before_decoding, **args)
        return CachedReader(decoded), decoded.fingerprint
    return DiskReader(samples, **args), fingerprint(samples, **args)


def check_batch(p: DataParams, index: DatasetIndex, train_split: str) -> None:
    """A batch no larger than the training split (checked before any cache is built).

    EpochSampler would train one short batch of the whole split per epoch, which is not the
    batch the run was configured with and logged as (and would train nothing with drop-last
    semantics): a refusal says so rather than training something else."""
    count = len(index.samples[train_split])
    if p.batch_size > count:
        raise ConfigError(
            f"data.batch_size: {p.batch_size} is more than the {count} images of the training "
            f"split '{train_split}' ({index.root}): every epoch would be one batch of {count}. "
            f"Set data.batch_size to at most {count}, or use more training images")


def frame_names(index: DatasetIndex, split: str) -> list[str]:
    """Each frame of a split, in the dataset's order, by its image's path under the data root:
    the names that pair the frames two runs were scored on."""
    root = index.root.resolve()
    return [(s.image.resolve().relative_to(root).as_posix()
             if s.image.resolve().is_relative_to(root) else s.image.name)
            for s in index.samples[split]]


def data_index(p: DataParams, splits: tuple[str, ...]) -> DatasetIndex:
    """The samples of any splits of the configured dataset (evaluation on train, val or test)."""
    return p.index(splits)


def split_dataset(p: DataParams, split: str, *, index: DatasetIndex | None = None,
                  transform: v2.Transform | None = None, seed: int = 0,
                  before_decoding: Callable[[], None] | None = None
                  ) -> tuple[SegmentationDataset, str]:
    """One split as a dataset of the task (at data.scale, through the cache if enabled;
    without a transform: as validation, evaluate and the sweep's panel see it), and its
    fingerprint."""
    reader, printed = reader_for(p, data_index(p, (split,)) if index is None else index, split,
                                 before_decoding=before_decoding)
    return SegmentationDataset(reader, lut=task_lut(p), transform=transform, seed=seed), printed


def build_splits(p: DataParams, index: DatasetIndex, *, train_split: str, val_split: str,
                 train_transform: v2.Transform | None, seed: int,
                 before_decoding: Callable[[], None] | None = None) -> DataSplits:
    """The two splits a run trains and validates on (the batch checked first)."""
    check_batch(p, index, train_split)
    train, train_print = split_dataset(p, train_split, index=index, transform=train_transform,
                                       seed=seed, before_decoding=before_decoding)
    val, val_print = split_dataset(p, val_split, index=index, before_decoding=before_decoding)
    return DataSplits(train=train, val=val, index=index,
                      fingerprints={"train": train_print, "val": val_print},
                      frames={"train": frame_names(index, train_split),
                              "val": frame_names(index, val_split)})


@DATASETS.register("cityscapes", params=CityscapesParams)
def cityscapes(p: CityscapesParams, ctx: BuildContext, *, train_transform: v2.Transform | None,
               before_decoding: Callable[[], None] | None = None) -> DataSplits:
    """Cityscapes: official, folders or pairs layout."""
    if not p.root.is_dir():
        raise DataError(
            f"Cityscapes not found at {p.root.resolve()} (data.root).\n"
            f"Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            f"https://www.cityscapes-dataset.com/downloads/ (free registration), unzip both into "
            f"{p.root} so that it holds leftImg8bit/ and gtFine/, or point data.root elsewhere: "
            f"--set data.root=/path/to/cityscapes (Kaggle folder and pix2pix pair copies work too)")
    return _run_splits(p, ctx, train_transform=train_transform, before_decoding=before_decoding)


@DATASETS.register("synthetic", params=SyntheticParams)
def synthetic_streets(p: SyntheticParams, ctx: BuildContext, *,
                      train_transform: v2.Transform | None,
                      before_decoding: Callable[[], None] | None = None) -> DataSplits:
    """Synthetic streets, written to `root` on first use and then read like Cityscapes."""
    synthetic.ensure_dataset(p.root, num_train=p.num_train, num_val=p.num_val,
                             size=p.source_size, seed=p.seed)
    return _run_splits(p, ctx, train_transform=train_transform, before_decoding=before_decoding)


def _run_splits(p: DataParams, ctx: BuildContext, *, train_transform: v2.Transform | None,
                before_decoding: Callable[[], None] | None) -> DataSplits:
    """A registered dataset's two splits, named by its params (training_split,
    validation_split)."""
    train, val = p.training_split, p.validation_split
    return build_splits(p, p.index((train, val)), train_split=train, val_split=val,
                        train_transform=train_transform, seed=ctx.seed,
                        before_decoding=before_decoding)
