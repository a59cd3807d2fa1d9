"""Where Cityscapes copies keep their files, and reading one sample from any of them.

- official: leftImg8bit/<split>/<city>/X_leftImg8bit.png with gtFine/<split>/<city>/X_gtFine_
  {labelIds, labelTrainIds, color}.png (the first of those present is used);
- folders (Kaggle): <split>/{img|images}/NAME.* with <split>/{label|labels|mask|masks}/NAME.*,
  masks holding official ids, train ids or (approximate, maybe BGR) colours;
- pairs (pix2pix): <split>/NAME.*, the photo on the left half and the colour label on the right.

Every sample decodes to (RGB photo (H, W, 3) uint8, train ids (H, W) uint8, 255 = ignore).
Photos of any PIL mode become 8-bit RGB (`read_photo`, which predict uses too: 16-bit grey
scaled, never clipped); label files keep their values (16-bit ones too), never scaled.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cityseg.data.cityscapes import FAR_FROM_PALETTE, nearest_palette, train_ids_lut, valid_values
from cityseg.errors import DataError

LAYOUTS = ("official", "folders", "pairs")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIX = "_leftImg8bit.png"
OFFICIAL_MASKS = {"_gtFine_labelIds.png": "ids", "_gtFine_labelTrainIds.png": "train_ids",
                  "_gtFine_color.png": "color"}
FOLDER_IMAGES = ("img", "images")
FOLDER_MASKS = ("label", "labels", "mask", "masks")
ENCODING_SAMPLE = 8  # masks looked at to decide encoding and channel order
MAX_FAR_FRACTION = 0.05  # a colour mask with more pixels far from the palette is broken
GREY_16_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PNG reads 16-bit grey as I;16


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path  # the same file as `image` in the pairs layout


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Encoding:
    kind: str  # ids (official label ids) | train_ids | color
    channel_order: str  # rgb | bgr (colour masks; rgb otherwise)
    how: str  # how it was decided, for reports


@dataclass
class DatasetIndex:
    root: Path
    layout: str
    layout_how: str
    encoding: Encoding
    samples: dict[str, list[Sample]]  # per split
    problems: list[Problem] = field(default_factory=list)  # unpaired files


def detect_layout(root: Path) -> str:
    if (root / "leftImg8bit").is_dir():
        return "official"
    splits = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if any((s / d).is_dir() for s in splits for d in FOLDER_IMAGES):
        return "folders"
    if any(f.suffix.lower() in IMAGE_EXTS for s in splits for f in s.iterdir()):
        return "pairs"
    raise DataError(f"{root}: no Cityscapes layout found; expected one of\n"
                    f"  official: leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} + "
                    f"gtFine/<split>/<city>/...\n"
                    f"  folders:  <split>/{{img|images}}/NAME.png + "
                    f"<split>/{{label|labels|mask|masks}}/NAME.png\n"
                    f"  pairs:    <split>/NAME.jpg (photo left half, colour label right half)")


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def _official(root: Path, splits: tuple[str, ...]) -> tuple[dict, list[Problem], Encoding]:
    suffix = next((s for s in OFFICIAL_MASKS if any((root / "gtFine").glob(f"*/*/*{s}"))), None)
    if suffix is None:
        raise DataError(f"{root / 'gtFine'}: no masks (*_gtFine_labelIds.png, "
                        f"*_gtFine_labelTrainIds.png or *_gtFine_color.png) "
                        f"in any <split>/<city> folder")
    samples, problems = {}, []
    for split in splits:
        image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: folder not found; expected "
                            f"leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}")
        images = {p.name[: -len(IMAGE_SUFFIX)]: p
                  for p in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))}
        masks = {p.name[: -len(suffix)]: p for p in sorted(mask_dir.glob(f"*/*{suffix}"))}
        samples[split] = [Sample(images[k], masks[k]) for k in images if k in masks]
        problems += [Problem(images[k], f"image without mask (*{suffix})")
                     for k in images if k not in masks]
        problems += [Problem(masks[k], "mask without image") for k in masks if k not in images]
    kind = OFFICIAL_MASKS[suffix]
    return samples, problems, Encoding(kind, "rgb", f"official *{suffix} files")


def _first_dir(split_dir: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (split_dir / name).is_dir():
            return split_dir / name
    raise DataError(f"{split_dir}: none of the folders {'|'.join(names)}")


def _folders(root: Path, splits: tuple[str, ...]) -> tuple[dict, list[Problem]]:
    samples, problems = {}, []
    for split in splits:
        images = _images_in(_first_dir(root / split, FOLDER_IMAGES))
        masks = _images_in(_first_dir(root / split, FOLDER_MASKS))
        samples[split] = [Sample(images[k], masks[k]) for k in images if k in masks]
        problems += [Problem(images[k], "image without mask") for k in images if k not in masks]
        problems += [Problem(masks[k], "mask without image") for k in masks if k not in images]
    return samples, problems


def _pairs(root: Path, splits: tuple[str, ...]) -> dict:
    for split in splits:
        if not (root / split).is_dir():
            raise DataError(f"{root / split}: folder not found; expected <split>/NAME.jpg pairs")
    return {split: [Sample(p, p) for p in _images_in(root / split).values()] for split in splits}


def open_image(path: Path) -> Image.Image:
    """The decoded image; DataError naming the file if it is not an image, is truncated, or has
    more pixels than PIL's limit (PIL.Image.MAX_IMAGE_PIXELS: a decompression bomb)."""
    try:
        with warnings.catch_warnings():  # PIL only warns between the limit and twice it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                f.load()  # decodes now: truncated files fail here
                return f.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # PIL's message has the count
        size = f"{int(found[1]):,} pixels, " if found else ""
        raise DataError(f"{path}: not decoded: {size}over PIL's limit of "
                        f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS, its guard "
                        f"against decompression bombs)") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None


def _sixteen_bit(image: Image.Image, path: Path) -> np.ndarray:
    """The integer values of a 16-bit (or 32-bit integer) greyscale image, refused past 16 bits."""
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"{path}: 32-bit integer image with values from {values.min()} to "
                        f"{values.max()}, outside the 16-bit range 0..65535 that photos use; "
                        f"save it with 8 or 16 bits per channel")
    return values


def photo_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a photo in any PIL mode, or a DataError naming the file.

    16-bit greyscale is scaled to 8 bits (rounded: v * 255 / 65535, so an 8-bit image saved
    with 16 bits reads back exactly), never clipped. Palette, 1-bit, CMYK, YCbCr and the rest
    go through PIL's conversion. Alpha is dropped (the stored colours, as PIL, OpenCV and
    torchvision read them). Float images have no agreed range and are refused.
    """
    if image.mode in GREY_16_BIT:
        grey = _sixteen_bit(image, path).astype(np.uint32)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise DataError(f"{path}: 32-bit float image: its range is not defined (0..1? "
                        f"0..255?); save it with 8 or 16 bits per channel")
    if image.mode == "P":  # through RGBA: PIL warns when it drops palette transparency itself
        image = image.convert("RGBA")
    try:
        return np.array(image.convert("RGB"))  # writable: becomes a tensor
    except ValueError as err:
        raise DataError(f"{path}: image mode {image.mode} has no RGB conversion ({err}); "
                        f"save it as RGB") from None


def read_photo(path: Path, *, upright: bool = False) -> np.ndarray:
    """The photo in a file as (H, W, 3) uint8 RGB; DataError naming the file if it cannot be.
    upright: turned as its EXIF orientation says, as every viewer shows it (predict); training
    reads the stored pixels, which its masks were drawn on."""
    image = open_image(path)
    return photo_rgb(ImageOps.exif_transpose(image) if upright else image, path)


def _mask_pixels(sample: Sample, layout: str) -> np.ndarray:
    """The mask's raw values: (H, W) for single-channel masks, (H, W, 3) for colour ones."""
    mask = open_image(sample.mask)
    if layout == "pairs":
        rgb = photo_rgb(mask, sample.mask)
        return rgb[:, rgb.shape[1] // 2 :]
    if mask.mode in ("L", "P"):
        return np.asarray(mask)
    if mask.mode in GREY_16_BIT:  # label values as they are (never scaled); read_sample
        return _sixteen_bit(mask, sample.mask)  # refuses those outside the label table
    rgb = np.asarray(mask.convert("RGB"))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0]  # grey ids saved as RGB
    return rgb


def _detect_encoding(samples: list[Sample], layout: str) -> Encoding:
    if not samples:
        raise DataError("no samples to detect the mask encoding from")
    step = max(1, len(samples) // ENCODING_SAMPLE)
    pixels = [_mask_pixels(s, layout) for s in samples[::step][:ENCODING_SAMPLE]]
    n = len(pixels)
    if pixels[0].ndim == 2:
        values = np.unique(np.concatenate([p.ravel() for p in pixels]))
        if np.any((values >= 19) & (values < 255)):
            return Encoding("ids", "rgb", f"values up to {values[values < 255].max()} in {n} "
                                          f"masks: official ids")
        return Encoding("train_ids", "rgb", f"values within 0..18 and 255 in {n} masks: train ids")
    far = {order: np.mean([(nearest_palette(p if order == "rgb" else p[..., ::-1])[1]).mean()
                           for p in pixels])
           for order in ("rgb", "bgr")}
    order = min(far, key=far.get)
    return Encoding("color", order, f"{order.upper()} colours fit the palette better in {n} masks "
                                    f"(mean distance {far[order]:.1f} vs {max(far.values()):.1f})")


def index_dataset(root: Path, *, layout: str = "auto",
                  splits: tuple[str, ...] = ("train", "val")) -> DatasetIndex:
    """Find every sample of the splits, decide the mask encoding once, list unpaired files."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    how = "given" if layout != "auto" else "detected"
    layout = detect_layout(root) if layout == "auto" else layout
    problems: list[Problem] = []
    if layout == "official":
        samples, problems, encoding = _official(root, splits)
    else:
        samples, problems = (_folders(root, splits) if layout == "folders"
                             else (_pairs(root, splits), []))
        encoding = _detect_encoding([s for split in splits for s in samples[split]], layout)
    for split in splits:
        if not samples[split]:
            raise DataError(f"{root}: no samples in split {split!r} ({layout} layout)")
    return DatasetIndex(root, layout, how, encoding, samples, problems)


def read_sample(sample: Sample, *, layout: str,
                encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution (RGB photo, train ids); DataError naming the file if anything is off."""
    photo = read_photo(sample.image)
    if layout == "pairs":
        if photo.shape[1] % 2:
            raise DataError(f"{sample.image}: odd width {photo.shape[1]}; "
                            f"a pair is two equal halves")
        photo = photo[:, : photo.shape[1] // 2]
    pixels = _mask_pixels(sample, layout)
    if pixels.shape[:2] != photo.shape[:2]:
        raise DataError(f"{sample.mask}: mask size {pixels.shape[1]}x{pixels.shape[0]} differs "
                        f"from image size {photo.shape[1]}x{photo.shape[0]} of {sample.image}")
    if encoding.kind == "color":
        if pixels.ndim != 3:
            raise DataError(f"{sample.mask}: single-channel mask in a dataset of colour masks")
        rgb = pixels if encoding.channel_order == "rgb" else pixels[..., ::-1]
        train_ids, distance = nearest_palette(rgb)
        far = float((distance > FAR_FROM_PALETTE).mean())
        if far > MAX_FAR_FRACTION:
            raise DataError(f"{sample.mask}: {far:.0%} of pixels have colours outside "
                            f"the label table")
        return photo, train_ids
    if pixels.ndim != 2:
        raise DataError(f"{sample.mask}: colour mask in a dataset of {encoding.kind} masks")
    known = valid_values(encoding.kind)  # 256 entries; 16-bit label files may hold more
    bad = np.unique(pixels[(pixels > 255) | ~known[np.minimum(pixels, 255)]])
    if bad.size:
        raise DataError(f"{sample.mask}: mask values outside the label table ({encoding.kind}): "
                        f"{bad[:10].tolist()}")
    return photo, train_ids_lut(encoding.kind)[pixels]


def read_resized(sample: Sample, *, layout: str, encoding: Encoding,
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """read_sample, then resized to size (H, W): bilinear (antialiased) photo, nearest train ids."""
    photo, train_ids = read_sample(sample, layout=layout, encoding=encoding)
    height, width = size
    if photo.shape[:2] != (height, width):
        photo = np.array(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
        train_ids = np.array(Image.fromarray(train_ids).resize((width, height), Image.NEAREST))
    return photo, train_ids
