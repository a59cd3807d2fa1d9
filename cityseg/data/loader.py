"""What a run's DataLoaders are made of: the readers of a split (decoding each frame, or
reading the decode cache), the dataset (one sample as tensors, augmented from its own seed),
the samplers (which keys each rank reads, in what order) and the worker count.

The worker count (`data.num_workers: auto`): a machine's CPUs are shared by every process that
trains on it: the ranks torchrun started there (LOCAL_WORLD_SIZE) and the workers of `cityseg
sweep --jobs N` (which set CITYSEG_SWEEP_JOBS for their children). Each process gets an equal
share of the CPUs it may run on (its affinity mask, which taskset, cgroup cpusets and Slurm
narrow), keeps one core for its own training loop and gives the rest to its DataLoader workers.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from cityseg.data.cache import DecodedSplit
from cityseg.data.device_augment import DeviceAugmenter
from cityseg.data.layouts import Encoding, Sample, read_resized

SWEEP_JOBS_ENV = "CITYSEG_SWEEP_JOBS"
MAX_AUTO_WORKERS = 8  # beyond it, more decoding processes cost memory and buy little


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

    def spread(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`count` samples spaced evenly over the split (all of it if smaller) as (images,
        masks) batches, unaugmented: the fixed images of sample panels. Evenly, not the first:
        frames sorted by name are one city's, or one video's nearly identical, in a row. None
        for count 0."""
        return self.take(spaced(len(self), count))

    def take(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The samples at `indices` as (images, masks) batches, unaugmented; None for none."""
        pairs = [self[i] for i in indices]
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


def spaced(length: int, count: int) -> list[int]:
    """`count` indices spaced evenly over range(length), the first at 0 (all of them when count
    is at least length): 10, 4 -> [0, 2, 5, 7]."""
    if count >= length:
        return list(range(length))
    return [i * length // count for i in range(count)]


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


# ---------------------------------------------------------------- data.num_workers: auto


def available_cpus() -> int:
    """The CPUs this process may run on (not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_share() -> int:
    """This process's share of the available CPUs (at least one)."""
    sharers = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * int(os.environ.get(SWEEP_JOBS_ENV,
                                                                                "1"))
    return max(1, available_cpus() // max(1, sharers))


def loader_workers(num_workers: int | str) -> int:
    """data.num_workers as a count: `auto` is the process's CPU share less the core its
    training loop runs on (so a 2-core machine gets one worker, a 1-core share none)."""
    if num_workers != "auto":
        return int(num_workers)
    return min(MAX_AUTO_WORKERS, cpu_share() - 1)
