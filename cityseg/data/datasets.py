"""Dataset registry entries: where samples come from, and how one sample becomes tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from cityseg.data import synthetic
from cityseg.data.cache import DecodedSplit, fingerprint, load_or_build
from cityseg.data.cityscapes import DEFAULT_FOREGROUND, TRAIN_CLASSES
from cityseg.data.device_augment import DeviceAugmenter
from cityseg.data.layouts import DatasetIndex, Encoding, Sample, index_dataset, read_resized
from cityseg.data.tasks import TASKS
from cityseg.data.workers import loader_workers
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


class DiskReader:
    """Decodes and resizes each sample when asked (no cache)."""

    def __init__(self, samples: list[Sample], *, layout: str, encoding: Encoding,
                 size: tuple[int, int]) -> None:
        self.samples, self.layout, self.encoding, self.size = samples, layout, encoding, size
        self._counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return read_resized(self.samples[i], layout=self.layout, encoding=self.encoding,
                            size=self.size)

    def class_counts(self) -> np.ndarray:
        """Pixels per train id, decoded once (pos_weight auto and the run's data report both
        ask)."""
        if self._counts is None:
            self._counts = np.zeros(256, dtype=np.int64)
            for i in range(len(self)):
                self._counts += np.bincount(self[i][1].ravel(), minlength=256)
        return self._counts


class CachedReader:
    """Reads decoded arrays from a cache; memory maps are opened lazily in each worker process."""

    def __init__(self, decoded: DecodedSplit) -> None:
        self.decoded = decoded
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.decoded.count

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = self.decoded.arrays()
        images, masks = self._arrays
        return np.array(images[i]), np.array(masks[i])

    def __getstate__(self) -> dict:  # workers re-open the maps rather than pickling the data
        return {"decoded": self.decoded, "_arrays": None}

    def class_counts(self) -> np.ndarray:
        return self.decoded.class_counts


class SegmentationDataset(Dataset):
    """(image uint8 (3, H, W), mask uint8 (H, W)) in the task's labels, augmented if asked.

    Indexed by (epoch, index) from an EpochSampler, the augmentation is seeded by
    (seed, epoch, index): the same sample gets the same augmentation whatever the worker count,
    and a resumed run sees exactly what an uninterrupted one would. Normalisation happens on
    the device.
    """

    def __init__(self, reader: DiskReader | CachedReader, *, lut: np.ndarray,
                 transform: v2.Transform | None, seed: int = 0) -> None:
        self.reader = reader
        self.lut = lut  # train id -> task label
        self.transform = transform
        self.seed = seed
        # set: the augmentations run batched on the training device; each sample comes
        # unaugmented with its parameters, drawn here from its seed
        self.device_augment: DeviceAugmenter | None = None

    def __len__(self) -> int:
        return len(self.reader)

    def first(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first `count` samples (fewer if the split is smaller) as (images, masks)
        batches, unaugmented: the fixed images of sample panels. None for count 0."""
        pairs = [self[i] for i in range(min(count, len(self)))]
        if not pairs:
            return None
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        photo, train_ids = self.reader[index]
        img = tv_tensors.Image(torch.from_numpy(photo).permute(2, 0, 1))  # (3, H, W)
        mask = tv_tensors.Mask(torch.from_numpy(self.lut[train_ids]))  # (H, W)
        seed = sample_seed(self.seed, epoch, index)
        if self.device_augment is not None:
            return (img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor),
                    self.device_augment.draw(seed, tuple(img.shape)))
        if self.transform is not None:
            img, mask = augment_sample(self.transform, img, mask, seed)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a function of (seed, epoch, index)."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % 2**63


def augment_sample(transform: v2.Transform, img: torch.Tensor, mask: torch.Tensor,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample through the augmentations, their random parameters drawn from `seed` (on
    the CPU generator, wherever the pixels are), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(tv_tensors.Image(img), tv_tensors.Mask(mask))


class EpochSampler(Sampler):
    """Yields (epoch, index) keys in an order fixed by (seed, epoch), from global batch
    `start_batch` on. With several ranks, each takes an equal contiguous share of every global
    batch, so the ranks together train on exactly the batches one process would; the last,
    partial batch is split evenly (up to world - 1 of its samples are left out)."""

    def __init__(self, size: int, *, seed: int, shuffle: bool, batch_size: int,
                 rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch, self.start_batch = 1, 0

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Order of `epoch`, from global batch `start_batch` (a run resumed mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _shares(self) -> list[int]:
        """Samples this rank takes from each global batch of an epoch."""
        full, rest = divmod(self.size, self.batch_size)
        shares = [self.batch_size // self.world] * full
        if rest // self.world:
            shares.append(rest // self.world)
        return shares

    @property
    def batches(self) -> int:
        """Global batches (steps) per epoch."""
        return len(self._shares())

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        keys = []
        for batch, share in enumerate(self._shares()):
            if batch >= self.start_batch:
                first = batch * self.batch_size + self.rank * share
                keys += [(self.epoch, i) for i in order[first : first + share]]
        return iter(keys)

    def __len__(self) -> int:
        return sum(self._shares()[self.start_batch :])


class ShardSampler(Sampler):
    """Every `world`-th index from `rank`: the ranks together see each sample exactly once."""

    def __init__(self, size: int, *, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataSplits:
    train: SegmentationDataset
    val: SegmentationDataset
    index: DatasetIndex
    fingerprints: dict[str, str] = field(default_factory=dict)  # per split

    def train_class_counts(self) -> np.ndarray:
        """Pixels per train id in the (resized) training split."""
        return self.train.reader.class_counts()


def reader_for(p: DataParams, index: DatasetIndex,
               split: str) -> tuple[DiskReader | CachedReader, str]:
    """A reader of the split at data.scale (else image_size; through the cache if enabled),
    and its fingerprint."""
    samples = index.samples[split]
    args = {"layout": index.layout, "encoding": index.encoding, "size": p.frame_size}
    if p.cache:
        decoded = load_or_build(samples, cache_dir=p.cache_dir, workers=p.workers, **args)
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


def data_index(p: DataParams, splits: tuple[str, ...]) -> DatasetIndex:
    """The samples of any splits of the configured dataset (evaluation on train, val or test)."""
    return p.index(splits)


def build_splits(p: DataParams, index: DatasetIndex, *, train_split: str, val_split: str,
                 train_transform: v2.Transform | None, seed: int) -> DataSplits:
    """Readers (cached or not) for the two splits, wrapped as datasets of the task."""
    check_batch(p, index, train_split)
    readers, prints = {}, {}
    for split in (train_split, val_split):
        readers[split], prints[split] = reader_for(p, index, split)
    lut = task_lut(p)
    return DataSplits(
        train=SegmentationDataset(readers[train_split], lut=lut, transform=train_transform,
                                  seed=seed),
        val=SegmentationDataset(readers[val_split], lut=lut, transform=None),
        index=index, fingerprints={"train": prints[train_split], "val": prints[val_split]})


@DATASETS.register("cityscapes", params=CityscapesParams)
def cityscapes(p: CityscapesParams, ctx: BuildContext, *,
               train_transform: v2.Transform | None) -> DataSplits:
    """Cityscapes: official, folders or pairs layout."""
    if not p.root.is_dir():
        raise DataError(
            f"Cityscapes not found at {p.root.resolve()} (data.root).\n"
            f"Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            f"https://www.cityscapes-dataset.com/downloads/ (free registration), unzip both into "
            f"{p.root} so that it holds leftImg8bit/ and gtFine/, or point data.root elsewhere: "
            f"--set data.root=/path/to/cityscapes (Kaggle folder and pix2pix pair copies work too)")
    index = p.index((p.train_split, p.val_split))
    return build_splits(p, index, train_split=p.train_split, val_split=p.val_split,
                        train_transform=train_transform, seed=ctx.seed)


@DATASETS.register("synthetic", params=SyntheticParams)
def synthetic_streets(p: SyntheticParams, ctx: BuildContext, *,
                      train_transform: v2.Transform | None) -> DataSplits:
    """Synthetic streets, written to `root` on first use and then read like Cityscapes."""
    synthetic.ensure_dataset(p.root, num_train=p.num_train, num_val=p.num_val,
                             size=p.source_size, seed=p.seed)
    index = p.index(("train", "val"))
    return build_splits(p, index, train_split="train", val_split="val",
                        train_transform=train_transform, seed=ctx.seed)
