"""Synthetic street scenes written to disk in the official Cityscapes layout.

A painter's-algorithm renderer: sky, buildings, pavement and a road in perspective, then
trees, poles, cars and persons scaled by their distance, an optional ego-vehicle hood (void),
and global lighting and sensor noise. Every scene is a pure function of (seed, split, index),
so the quickstart trains on the same data on every machine with no download.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cityseg.data.cityscapes import LABEL_BY_NAME, id_colors, id_to_train_id_lut
from cityseg.data.layouts import IMAGE_SUFFIX
from cityseg.errors import DataError

CITY = "synthtown"
SPLIT_OFFSETS = {"train": 0, "val": 1}
_ID = {name: LABEL_BY_NAME[name].id for name in (
    "sky", "building", "road", "sidewalk", "vegetation", "pole", "car", "person", "ego vehicle")}


class _Canvas:
    """Draws every shape into the photo and, with its class id, into the label image."""

    def __init__(self, height: int, width: int) -> None:
        self.image = Image.new("RGB", (width, height))
        self.label = Image.new("L", (width, height))
        self._rgb = ImageDraw.Draw(self.image)
        self._ids = ImageDraw.Draw(self.label)

    def polygon(self, points, color, cls: str | None) -> None:
        self._rgb.polygon(points, fill=tuple(int(c) for c in color))
        if cls:
            self._ids.polygon(points, fill=_ID[cls])

    def rect(self, box, color, cls: str | None) -> None:
        self._rgb.rectangle(box, fill=tuple(int(c) for c in color))
        if cls:
            self._ids.rectangle(box, fill=_ID[cls])

    def ellipse(self, box, color, cls: str | None) -> None:
        self._rgb.ellipse(box, fill=tuple(int(c) for c in color))
        if cls:
            self._ids.ellipse(box, fill=_ID[cls])


def render_scene(rng: np.random.Generator, height: int,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (H, W, 3) uint8 photo and (H, W) uint8 official label ids."""
    H, W = height, width
    c = _Canvas(H, W)
    horizon = H * rng.uniform(0.36, 0.46)
    vx = W * rng.uniform(0.4, 0.6)  # vanishing point

    sky = rng.integers(120, 220, 3) * np.array([0.7, 0.85, 1.0])
    c.rect((0, 0, W, H), sky, "sky")

    x = -rng.uniform(0, 0.1) * W  # buildings along the horizon, left to right
    while x < W:
        bw = W * rng.uniform(0.08, 0.22)
        top = H * rng.uniform(0.03, 0.3)
        base = rng.integers(60, 170, 3)
        c.rect((x, top, x + bw, horizon + 0.15 * H), base, "building")
        for wy in np.arange(top + 0.03 * H, horizon, 0.07 * H):  # windows: texture, same class
            for wx in np.arange(x + 0.02 * W, x + bw - 0.03 * W, 0.05 * W):
                c.rect((wx, wy, wx + 0.02 * W, wy + 0.035 * H), base * 0.45, None)
        x += bw

    def road_edges(y: float, spread: tuple[float, float]) -> tuple[float, float]:
        t = (y - horizon) / (H - horizon)
        return vx + t * (spread[0] - vx), vx + t * (spread[1] - vx)

    grey = rng.integers(150, 200)
    c.polygon([(vx - 0.03 * W, horizon), (vx + 0.03 * W, horizon), (2.0 * W, H), (-1.0 * W, H)],
              (grey, grey - 5, grey - 10), "sidewalk")
    road = (W * rng.uniform(-0.15, 0.15), W * rng.uniform(0.85, 1.15))
    asphalt = rng.integers(60, 110)
    c.polygon([(vx, horizon), (road[0], H), (road[1], H)], (asphalt,) * 3, "road")
    for y0 in np.arange(horizon + 0.06 * H, H, 0.12 * H):  # lane dashes are road too
        y1 = min(y0 + 0.05 * H, H)
        t0, t1 = (y0 - horizon) / (H - horizon), (y1 - horizon) / (H - horizon)
        c.polygon([(vx - 0.004 * W * t0 * 4, y0), (vx + 0.004 * W * t0 * 4, y0),
                   (vx + 0.004 * W * t1 * 4, y1), (vx - 0.004 * W * t1 * 4, y1)],
                  (230, 230, 230), "road")

    def depth(y: float) -> float:
        return (y - horizon) / (H - horizon)

    objects = []  # (y_bottom, kind): drawn far to near so near objects occlude far ones
    for _ in range(rng.integers(1, 4)):
        objects.append((horizon + (H - horizon) * rng.uniform(0.1, 0.6), "tree"))
    for _ in range(rng.integers(1, 4)):
        objects.append((horizon + (H - horizon) * rng.uniform(0.1, 0.9), "pole"))
    for _ in range(rng.integers(1, 5)):
        objects.append((horizon + (H - horizon) * rng.uniform(0.15, 1.0), "car"))
    for _ in range(rng.integers(1, 5)):
        objects.append((horizon + (H - horizon) * rng.uniform(0.15, 1.0), "person"))

    for yb, kind in sorted(objects):
        s = depth(yb)
        left, right = road_edges(yb, road)
        if kind == "car":
            cw = W * 0.38 * s
            cx = rng.uniform(left + cw / 2, max(left + cw / 2, right - cw / 2))
            ch = cw * rng.uniform(0.5, 0.65)
            paint = rng.integers(0, 256, 3)
            x0, x1 = cx - cw / 2, cx + cw / 2
            c.rect((x0, yb - ch * 0.6, x1, yb - ch * 0.12), paint, "car")
            c.polygon([(x0 + cw * 0.15, yb - ch * 0.6), (x0 + cw * 0.3, yb - ch),
                       (x1 - cw * 0.3, yb - ch), (x1 - cw * 0.15, yb - ch * 0.6)], paint, "car")
            c.polygon([(x0 + cw * 0.22, yb - ch * 0.62), (x0 + cw * 0.33, yb - ch * 0.92),
                       (x1 - cw * 0.33, yb - ch * 0.92), (x1 - cw * 0.22, yb - ch * 0.62)],
                      (40, 50, 60), "car")  # windscreen
            for wx in (x0 + cw * 0.08, x1 - cw * 0.28):
                c.ellipse((wx, yb - ch * 0.3, wx + cw * 0.2, yb), (20, 20, 20), "car")
        elif kind == "person":
            ph = H * 0.45 * s
            side = rng.choice([-1, 1])
            edge = left if side < 0 else right
            px = edge + side * rng.uniform(0.02, 0.25) * W * s
            pw = ph * 0.28
            shirt, trousers = rng.integers(0, 256, 3), rng.integers(0, 120, 3)
            c.rect((px - pw * 0.35, yb - ph * 0.45, px - pw * 0.05, yb), trousers, "person")
            c.rect((px + pw * 0.05, yb - ph * 0.45, px + pw * 0.35, yb), trousers, "person")
            c.rect((px - pw / 2, yb - ph * 0.82, px + pw / 2, yb - ph * 0.42), shirt, "person")
            skin = np.array([224, 172, 105]) * rng.uniform(0.5, 1.1)
            c.ellipse((px - pw * 0.3, yb - ph, px + pw * 0.3, yb - ph * 0.8), skin, "person")
        elif kind == "pole":
            side = rng.choice([-1, 1])
            edge = left if side < 0 else right
            px = edge + side * 0.03 * W * s
            c.rect((px, yb - H * 0.9 * s, px + max(1.0, 0.012 * W * s), yb), (90, 90, 95), "pole")
        else:  # tree: trunk and canopy are both vegetation in Cityscapes
            side = rng.choice([-1, 1])
            edge = left if side < 0 else right
            tx = edge + side * rng.uniform(0.1, 0.3) * W * s
            th, green = H * 0.8 * s, rng.integers(40, 140, 3) * np.array([0.6, 1.0, 0.5])
            c.rect((tx - 0.01 * W * s, yb - th * 0.5, tx + 0.01 * W * s, yb), (80, 60, 40),
                   "vegetation")
            c.ellipse((tx - th * 0.3, yb - th, tx + th * 0.3, yb - th * 0.4), green, "vegetation")

    if rng.random() < 0.5:  # ego-vehicle hood: void, so ignored by training and metrics
        hood = H * rng.uniform(0.04, 0.1)
        c.polygon([(0, H), (W * 0.1, H - hood), (W * 0.9, H - hood), (W, H)], (30, 30, 35),
                  "ego vehicle")

    photo = np.asarray(c.image, dtype=np.float32)
    gain = rng.uniform(0.6, 1.25) * np.linspace(rng.uniform(0.8, 1.2), 1.0, W)[None, :, None]
    photo = photo * gain + rng.normal(0.0, rng.uniform(2, 8), photo.shape)
    return np.clip(photo, 0, 255).astype(np.uint8), np.asarray(c.label, dtype=np.uint8)


def frame_name(index: int) -> str:
    return f"{CITY}_{index:06d}_000019"


MASK_ENCODINGS = ("ids", "train_ids", "color")
OFFICIAL_SUFFIX = {"ids": "_gtFine_labelIds.png", "train_ids": "_gtFine_labelTrainIds.png",
                   "color": "_gtFine_color.png"}


def encode_mask(ids: np.ndarray, encoding: str, *, bgr: bool = False) -> np.ndarray:
    """Official ids -> the mask as a copy would store it: ids, train ids or (RGB/BGR) colours."""
    if encoding == "ids":
        return ids
    if encoding == "train_ids":
        return id_to_train_id_lut()[ids]
    rgb = id_colors()[ids]
    return rgb[..., ::-1].copy() if bgr else rgb


def _save(array: np.ndarray, path: Path, jpeg_quality: int) -> None:
    if jpeg_quality:
        Image.fromarray(array).save(path.with_suffix(".jpg"), quality=jpeg_quality)
    else:
        Image.fromarray(array).save(path.with_suffix(".png"))


def write_dataset(root: Path, *, num_train: int, num_val: int, size: tuple[int, int], seed: int,
                  layout: str = "official", mask: str = "ids", bgr: bool = False,
                  jpeg_quality: int = 0) -> None:
    """Write `num_train` + `num_val` scenes of `size` (H, W) to `root` in a Cityscapes layout.

    layout official | folders | pairs; mask ids | train_ids | color (pairs are always colour);
    bgr swaps colour channels and jpeg_quality > 0 saves JPEG instead of PNG (folders, pairs),
    as some downloadable copies do.
    """
    if layout == "official" and (bgr or jpeg_quality):
        raise ValueError("the official layout has exact RGB PNG masks: no bgr, no jpeg")
    for split, count in (("train", num_train), ("val", num_val)):
        for i in range(count):
            rng = np.random.default_rng([seed, SPLIT_OFFSETS[split], i])
            photo, ids = render_scene(rng, *size)
            name = frame_name(i)
            if layout == "official":
                image_dir, mask_dir = (root / "leftImg8bit" / split / CITY,
                                       root / "gtFine" / split / CITY)
                image_path, mask_path = (image_dir / f"{name}{IMAGE_SUFFIX}",
                                         mask_dir / f"{name}{OFFICIAL_SUFFIX[mask]}")
            elif layout == "folders":
                image_dir, mask_dir = root / split / "img", root / split / "label"
                image_path, mask_path = image_dir / name, mask_dir / name
            else:
                image_dir = mask_dir = root / split
                pair = np.concatenate([photo, encode_mask(ids, "color", bgr=bgr)], axis=1)
                image_dir.mkdir(parents=True, exist_ok=True)
                _save(pair, image_dir / name, jpeg_quality)
                continue
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            if layout == "official":
                Image.fromarray(photo).save(image_path)
                Image.fromarray(encode_mask(ids, mask)).save(mask_path)
            else:
                _save(photo, image_path, jpeg_quality)
                _save(encode_mask(ids, mask, bgr=bgr), mask_path,
                      jpeg_quality if mask == "color" else 0)


MANIFEST = "synthetic.json"


def ensure_dataset(root: Path, *, num_train: int, num_val: int, size: tuple[int, int],
                   seed: int) -> bool:
    """Generate the dataset at `root` unless an identical one is there; True if it was written.

    Written to a temporary sibling and renamed, so an interrupted generation never leaves a
    half-written dataset, under a lock, so parallel runs (sweep children on a fresh checkout)
    generate it once and never delete it under each other.
    """
    spec = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == spec:
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if manifest.is_file() and json.loads(manifest.read_text()) == spec:
            return False  # another process wrote it while this one waited
        if root.exists() and not manifest.is_file():
            raise DataError(f"{root} exists but is not a synthetic dataset (no {MANIFEST}); "
                            f"choose another data.root")
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_dataset(tmp, num_train=num_train, num_val=num_val, size=size, seed=seed)
        (tmp / MANIFEST).write_text(json.dumps(spec))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    return True
