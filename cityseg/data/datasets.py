"""Dataset registry entries: where samples come from, and how one sample becomes tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cityseg.data import synthetic
from cityseg.data.cityscapes import (
    DEFAULT_FOREGROUND,
    TRAIN_CLASSES,
    Sample,
    id_to_train_id_lut,
    official_samples,
    train_id_to_binary_lut,
)
from cityseg.errors import DataError
from cityseg.registry import DATASETS, BuildContext, Params

TrainClass = Literal[TRAIN_CLASSES]  # type: ignore[valid-type]


class DataParams(Params):
    """Fields every dataset shares: task, sizes and loading."""

    task: Literal["binary"] = Field(
        "binary", description="binary: the foreground classes vs the rest, void pixels ignored")
    foreground: list[TrainClass] = Field(
        list(DEFAULT_FOREGROUND), min_length=1,
        description="Cityscapes train classes that count as foreground in the binary task")
    image_size: tuple[int, int] = Field(
        (256, 512), description="(height, width) that images and masks are resized to")
    batch_size: int = Field(8, ge=1, description="images per training and validation batch")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (0 = main process)")

    @field_validator("image_size")
    @classmethod
    def _positive(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError(f"image_size must be positive, got {list(size)}")
        return size


class CityscapesParams(DataParams):
    """Cityscapes in the official layout (leftImg8bit/ + gtFine/ with *_labelIds.png)."""

    root: Path = Field(Path("data/cityscapes"), description="folder holding leftImg8bit/ and gtFine/")
    train_split: str = Field("train", description="split used for training")
    val_split: str = Field("val", description="split used for validation")


class SyntheticParams(DataParams):
    """Procedural street scenes, generated on first use in the official layout."""

    root: Path = Field(Path("runs/data/synthetic"), description="where the scenes are written")
    num_train: int = Field(256, ge=1, description="training scenes")
    num_val: int = Field(64, ge=1, description="validation scenes")
    source_size: tuple[int, int] = Field((128, 256), description="(height, width) of the written PNGs")
    seed: int = Field(0, description="generator seed; the same seed writes the same scenes")


@dataclass(frozen=True)
class DataSplits:
    train: Dataset
    val: Dataset


class SegmentationDataset(Dataset):
    """Decodes one image/mask pair, maps official ids to the task's labels, resizes, augments.

    Returns (image uint8 (3, H, W), mask uint8 (H, W)); normalisation happens on the device.
    """

    def __init__(self, samples: list[Sample], *, size: tuple[int, int], lut: np.ndarray,
                 transform: v2.Transform | None) -> None:
        self.samples = samples
        self.size = size
        self.lut = lut  # official id -> task label (255 = ignore)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image, ids = _read_pair(sample)
        height, width = self.size
        image = image.resize((width, height), Image.BILINEAR)
        ids = ids.resize((width, height), Image.NEAREST)
        img = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # (3, H, W)
        mask = tv_tensors.Mask(torch.from_numpy(self.lut[np.asarray(ids)]))  # (H, W)
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _read_pair(sample: Sample) -> tuple[Image.Image, Image.Image]:
    try:
        with Image.open(sample.image) as f:
            image = f.convert("RGB")
        with Image.open(sample.mask) as f:
            if f.mode not in ("L", "P"):
                raise DataError(f"{sample.mask}: mask mode {f.mode!r}; expected 8-bit label ids")
            ids = f.copy()
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read sample {sample.image.name}: {err}") from err
    if image.size != ids.size:
        raise DataError(f"{sample.mask}: mask size {ids.size} differs from image size "
                        f"{image.size} of {sample.image}")
    return image, ids


def task_lut(p: DataParams) -> np.ndarray:
    """Official id -> label of the configured task."""
    return train_id_to_binary_lut(p.foreground)[id_to_train_id_lut()]


def _official_splits(p: CityscapesParams | SyntheticParams, root: Path, train_split: str,
                     val_split: str, train_transform: v2.Transform | None) -> DataSplits:
    lut = task_lut(p)
    train = official_samples(root, train_split)
    val = official_samples(root, val_split)
    return DataSplits(
        train=SegmentationDataset(train, size=p.image_size, lut=lut, transform=train_transform),
        val=SegmentationDataset(val, size=p.image_size, lut=lut, transform=None),
    )


@DATASETS.register("cityscapes", params=CityscapesParams)
def cityscapes(p: CityscapesParams, ctx: BuildContext, *,
               train_transform: v2.Transform | None) -> DataSplits:
    """Cityscapes in the official layout."""
    if not p.root.is_dir():
        raise DataError(
            f"Cityscapes not found at {p.root.resolve()} (data.root).\n"
            f"Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            f"https://www.cityscapes-dataset.com/downloads/ (free registration), unzip both into "
            f"{p.root} so that it holds leftImg8bit/ and gtFine/, or point data.root elsewhere: "
            f"--set data.root=/path/to/cityscapes")
    return _official_splits(p, p.root, p.train_split, p.val_split, train_transform)


@DATASETS.register("synthetic", params=SyntheticParams)
def synthetic_streets(p: SyntheticParams, ctx: BuildContext, *,
                      train_transform: v2.Transform | None) -> DataSplits:
    """Synthetic streets, written to `root` on first use and then read like Cityscapes."""
    synthetic.ensure_dataset(p.root, num_train=p.num_train, num_val=p.num_val,
                             size=p.source_size, seed=p.seed)
    return _official_splits(p, p.root, "train", "val", train_transform)
