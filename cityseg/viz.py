"""Sample panels: Input | Ground truth | Prediction | Error, one row per validation image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cityseg.data.cityscapes import IGNORE_INDEX

COLUMNS = ("Input", "Ground truth", "Prediction", "Error")
IGNORED = (110, 110, 110)
# Error colours: true positive white, false positive red, false negative blue, true negative black.
TP, FP, FN = (255, 255, 255), (230, 40, 40), (40, 120, 255)
MIN_HEIGHT = 128  # small training images are upscaled so the panel stays readable


def _mask_rgb(mask: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    rgb = np.repeat((mask == 1)[..., None] * np.uint8(255), 3, axis=2)
    rgb[ignore] = IGNORED
    return rgb


def _error_rgb(target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*target.shape, 3), dtype=np.uint8)
    rgb[(target == 1) & (pred == 1)] = TP
    rgb[(target == 0) & (pred == 1)] = FP
    rgb[(target == 1) & (pred == 0)] = FN
    rgb[target == IGNORE_INDEX] = IGNORED
    return rgb


def sample_panel(images: np.ndarray, targets: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 images, (N, H, W) targets and predictions -> one RGB panel (uint8)."""
    rows = []
    for image, target, pred in zip(images, targets, preds, strict=True):
        ignore = target == IGNORE_INDEX
        cells = [image.transpose(1, 2, 0), _mask_rgb(target, ignore),
                 _mask_rgb(pred, np.zeros_like(ignore)), _error_rgb(target, pred)]
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0))) for c in cells], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, -(-MIN_HEIGHT // images.shape[2]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    header = Image.new("RGB", (grid.width, 18), (255, 255, 255))
    draw, cell_width = ImageDraw.Draw(header), grid.width // len(COLUMNS)
    for i, title in enumerate(COLUMNS):
        draw.text((i * cell_width + 6, 3), title, fill=(0, 0, 0))
    panel = Image.new("RGB", (grid.width, grid.height + header.height))
    panel.paste(header, (0, 0))
    panel.paste(grid, (0, header.height))
    return np.asarray(panel)
