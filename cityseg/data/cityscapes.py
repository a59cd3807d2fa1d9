"""The Cityscapes label table and the official folder layout.

The table is the one of cityscapesScripts' `labels.py` (Cordts et al., CVPR 2016): official
ids 0..33 (and -1 for the license plate), the 19 evaluated classes with train ids 0..18, and
255 for everything that is not evaluated (void and rare classes), which cityseg ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cityseg.errors import DataError

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Label:
    name: str
    id: int
    train_id: int
    category: str
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", (0, 0, 0)),
    Label("rectification border", 2, 255, "void", (0, 0, 0)),
    Label("out of roi", 3, 255, "void", (0, 0, 0)),
    Label("static", 4, 255, "void", (0, 0, 0)),
    Label("dynamic", 5, 255, "void", (111, 74, 0)),
    Label("ground", 6, 255, "void", (81, 0, 81)),
    Label("road", 7, 0, "flat", (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", (244, 35, 232)),
    Label("parking", 9, 255, "flat", (250, 170, 160)),
    Label("rail track", 10, 255, "flat", (230, 150, 140)),
    Label("building", 11, 2, "construction", (70, 70, 70)),
    Label("wall", 12, 3, "construction", (102, 102, 156)),
    Label("fence", 13, 4, "construction", (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", (180, 165, 180)),
    Label("bridge", 15, 255, "construction", (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", (150, 120, 90)),
    Label("pole", 17, 5, "object", (153, 153, 153)),
    Label("polegroup", 18, 255, "object", (153, 153, 153)),
    Label("traffic light", 19, 6, "object", (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", (107, 142, 35)),
    Label("terrain", 22, 9, "nature", (152, 251, 152)),
    Label("sky", 23, 10, "sky", (70, 130, 180)),
    Label("person", 24, 11, "human", (220, 20, 60)),
    Label("rider", 25, 12, "human", (255, 0, 0)),
    Label("car", 26, 13, "vehicle", (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", (0, 0, 110)),
    Label("train", 31, 16, "vehicle", (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", (119, 11, 32)),
    Label("license plate", -1, 255, "vehicle", (0, 0, 142)),
)

LABEL_BY_NAME = {label.name: label for label in LABELS}
# The 19 evaluated classes, in train-id order.
TRAIN_CLASSES: tuple[str, ...] = tuple(
    label.name for label in sorted(LABELS, key=lambda lb: lb.train_id) if label.train_id != 255
)
DEFAULT_FOREGROUND: tuple[str, ...] = (
    "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


def id_to_train_id_lut() -> np.ndarray:
    """uint8 lookup table of 256 entries: official id -> train id (255 for ignored ids)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in LABELS:
        if label.id >= 0:
            lut[label.id] = label.train_id
    return lut


def train_id_to_binary_lut(foreground: tuple[str, ...] | list[str]) -> np.ndarray:
    """uint8 lookup table: train id -> 1 (foreground), 0 (background), 255 (ignored)."""
    unknown = sorted(set(foreground) - set(TRAIN_CLASSES))
    if unknown:
        raise ValueError(f"not Cityscapes train classes: {unknown}; valid: {list(TRAIN_CLASSES)}")
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[: len(TRAIN_CLASSES)] = 0
    for name in foreground:
        lut[LABEL_BY_NAME[name].train_id] = 1
    return lut


@dataclass(frozen=True)
class Sample:
    """One image and its mask on disk."""

    image: Path
    mask: Path


IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"


def official_samples(root: Path, split: str) -> list[Sample]:
    """Pairs of `leftImg8bit/<split>/<city>/X_leftImg8bit.png` and `gtFine/.../X_gtFine_labelIds.png`."""
    image_dir = root / "leftImg8bit" / split
    mask_dir = root / "gtFine" / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; expected the official Cityscapes layout "
                            f"leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX} and "
                            f"gtFine/{split}/<city>/*{MASK_SUFFIX} under {root}")
    samples, missing = [], []
    for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image.name[: -len(IMAGE_SUFFIX)]
        mask = mask_dir / image.parent.name / f"{stem}{MASK_SUFFIX}"
        if mask.is_file():
            samples.append(Sample(image, mask))
        else:
            missing.append(mask)
    if missing:
        shown = "\n  ".join(str(m) for m in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image(s) in {image_dir} have no mask:\n  {shown}{more}")
    if not samples:
        raise DataError(f"{image_dir}: no *{IMAGE_SUFFIX} files in any city folder")
    return samples
