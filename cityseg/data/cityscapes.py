"""The Cityscapes label table, and decoding of every mask encoding into train ids.

The table is the one of cityscapesScripts' `labels.py` (Cordts et al., CVPR 2016): official
ids 0..33 (and -1 for the license plate), the 19 evaluated classes with train ids 0..18, and
255 for everything that is not evaluated (void and rare classes), which cityseg ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def train_id_to_id_lut() -> np.ndarray:
    """uint8[256]: train id -> official label id (the inverse of `id_to_train_id_lut` on the 19
    classes; other values, never predicted, become 0, "unlabeled")."""
    lut = np.zeros(256, dtype=np.uint8)
    for label in LABELS:
        if label.train_id != IGNORE_INDEX:
            lut[label.train_id] = label.id
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


def train_ids_lut(encoding: str) -> np.ndarray:
    """uint8 lookup table from single-channel mask values to train ids (255 also for unknown
    values)."""
    if encoding == "ids":
        return id_to_train_id_lut()
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[: len(TRAIN_CLASSES)] = np.arange(len(TRAIN_CLASSES))
    return lut


def valid_values(encoding: str) -> np.ndarray:
    """bool[256]: which single-channel values a mask of this encoding may hold."""
    ok = np.zeros(256, dtype=bool)
    if encoding == "ids":
        ok[[label.id for label in LABELS if label.id >= 0]] = True
    else:
        ok[: len(TRAIN_CLASSES)] = True
        ok[IGNORE_INDEX] = True
    return ok


def _palette() -> tuple[np.ndarray, np.ndarray]:
    """Distinct label colours (K, 3) and their train ids; a shared colour goes to the train
    class."""
    by_color: dict[tuple[int, int, int], int] = {}
    for label in LABELS:
        if by_color.get(label.color, IGNORE_INDEX) == IGNORE_INDEX:
            by_color[label.color] = label.train_id
    colors = np.array(list(by_color), dtype=np.float32)
    return colors, np.array(list(by_color.values()), dtype=np.uint8)


PALETTE, PALETTE_TRAIN_IDS = _palette()
# A colour farther than this from every palette colour is "outside the table" (JPEG and
# resizing move colours by far less; a wrong palette or a photo moves them by far more).
FAR_FROM_PALETTE = 60.0


def nearest_palette(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) colours -> (train ids (H, W), distance to the nearest palette colour (H, W)).

    Works on the distinct colours only, so a JPEG-degraded mask costs one distance matrix of
    (distinct colours x palette), not one per pixel.
    """
    packed = ((rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8)
              | rgb[..., 2])
    unique, inverse = np.unique(packed.ravel(), return_inverse=True)
    colors = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255],
                      axis=1).astype(np.float32)
    dist = np.linalg.norm(colors[:, None, :] - PALETTE[None, :, :], axis=2)  # (U, K)
    nearest = dist.argmin(axis=1)
    shape = rgb.shape[:2]
    return (PALETTE_TRAIN_IDS[nearest][inverse].reshape(shape),
            dist[np.arange(len(unique)), nearest][inverse].reshape(shape))


def train_id_colors() -> np.ndarray:
    """(256, 3) uint8: the colour of each train id (black for ignore), for drawing masks."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    for label in LABELS:
        if label.train_id != IGNORE_INDEX:
            colors[label.train_id] = label.color
    return colors


def id_colors() -> np.ndarray:
    """(256, 3) uint8: the colour of each official id, as in the official *_color.png masks."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    for label in LABELS:
        if label.id >= 0:
            colors[label.id] = label.color
    return colors


def foreground_stats(counts: np.ndarray,
                     foreground: tuple[str, ...] | list[str]) -> tuple[float, float]:
    """(foreground fraction of labelled pixels, background/foreground ratio) from train-id
    counts."""
    labelled = counts[: len(TRAIN_CLASSES)]
    fg = int(sum(labelled[LABEL_BY_NAME[name].train_id] for name in foreground))
    total = int(labelled.sum())
    if fg == 0:
        return 0.0, float("inf")
    return fg / total, (total - fg) / fg


def class_frequencies(counts: np.ndarray) -> dict:
    """Ignored and labelled pixels, and each train class's pixels and share of the labelled
    ones, from pixels per train id (256 counts)."""
    labelled = int(counts[: len(TRAIN_CLASSES)].sum())
    return {"ignored_pixels": int(counts[IGNORE_INDEX]), "labelled_pixels": labelled,
            "classes": {name: {"pixels": int(counts[i]),
                               "frequency": int(counts[i]) / max(1, labelled)}
                        for i, name in enumerate(TRAIN_CLASSES)}}
