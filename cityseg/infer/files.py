"""`cityseg predict` on files: the inputs named (images, videos, folders), the --out folder
checked before a model loads, and per input its mask, overlay (and probability) PNGs, or its
videos (video.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cityseg import viz
from cityseg.data.layouts import IMAGE_EXTS, read_photo
from cityseg.errors import CitysegError, DataError, StorageError
from cityseg.infer import video
from cityseg.infer.loading import Trained
from cityseg.runtime.files import written_whole


class _PerSecond(ProgressColumn):
    """Items per second, once rich has measured some."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


def progress_bar(console: Console) -> Progress:
    """The bar `predict` shows: the inputs, and the frames of each video, each with its rate
    and the time left (unknown while a video does not say how many frames it has)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _PerSecond(), TimeRemainingColumn(), console=console)


def input_files(paths: list[Path]) -> list[Path]:
    """The files named, and the images and videos in the folders named (searched recursively)."""
    suffixes = (*IMAGE_EXTS, *video.VIDEO_EXTS)
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
        elif path.exists():
            files.append(path)
        else:
            raise CitysegError(f"{path}: no such file or folder")
    return files


INCOMPLETE = "incomplete: "  # a skipped line of an input written in part (a video cut short)


def check_out(out: Path) -> None:
    """--out must be a folder or creatable as one: refused before any model is loaded."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"is inside {folder}, a file"
                raise CitysegError(f"--out {out}: {what}; give a folder (created if missing)")
            return


def make_out(out: Path) -> None:
    """Create the --out folder (and its parents); StorageError naming it if that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"--out {out}: cannot create the folder ({err.strerror})") from None


def save_png(image: np.ndarray, path: Path, *, written: int) -> None:
    """One PNG; StorageError naming it (and how many inputs were done before it) on failure."""
    try:  # beside its name, then renamed: a link already there is replaced, never followed
        with written_whole(path) as partial:
            Image.fromarray(image).save(partial, format="PNG")
    except OSError as err:
        raise StorageError(f"{path}: cannot write ({err.strerror or err}); {written} input(s) "
                           f"written before it") from None


def tracked(progress: Progress | None, files: list[Path], description: str):
    """The files, counted on the progress bar when there is one."""
    return files if progress is None else progress.track(files, description=description)


def _predict_photo(trained: Trained, path: Path, out: Path, stem: str, *, probabilities: bool,
                   written: int) -> Path:
    """<stem>_mask.png, <stem>_overlay.png (and <stem>_prob.png) of one image; its mask's path."""
    photo = read_photo(path, upright=True)  # as viewers show it (EXIF orientation)
    labels, prob = trained.predictor.predict_photo(photo)
    images = {"mask": trained.task.mask_values[labels],
              "overlay": viz.overlay(photo, labels, trained.task)}
    if probabilities and prob is not None:
        images["prob"] = (prob * 255).round().astype(np.uint8)
    for kind, image in images.items():
        save_png(image, out / f"{stem}_{kind}.png", written=written)
    return out / f"{stem}_mask.png"


def predict_files(trained: Trained, inputs: list[Path], out: Path, *, probabilities: bool,
                  masks: bool = False, progress: Progress | None = None
                  ) -> tuple[list[Path], list[str]]:
    """Write <stem>_mask.png, <stem>_overlay.png (and <stem>_prob.png) per image, and
    <stem>_overlay.mp4 (and with masks <stem>_mask.mp4) per video; an input that cannot or
    should not be decoded is skipped, named, and the rest go on. Two inputs of the same stem
    get <stem>, <stem>_1, ... (an image and a video of one stem need not: their files differ).
    Returns (written: each image's mask and each video's overlay, skipped: one
    "<path>: <reason>" each)."""
    check_out(out)
    files = input_files(inputs)
    make_out(out)
    written, skipped, used = [], [], set()
    for path in tracked(progress, files, "inputs"):
        is_video = path.suffix.lower() in video.VIDEO_EXTS
        stem, n = path.stem, 1
        while (stem, is_video) in used:
            stem, n = f"{path.stem}_{n}", n + 1
        try:
            if is_video:
                written.append(video.predict_video(trained, path, out, stem, masks=masks,
                                                   progress=progress))
            else:
                written.append(_predict_photo(trained, path, out, stem,
                                              probabilities=probabilities, written=len(written)))
        except video.CutShort as err:  # written, but not the whole input
            written.append(err.written)
            skipped.append(f"{INCOMPLETE}{err}")
        except DataError as err:
            skipped.append(str(err))
            continue
        used.add((stem, is_video))
    return written, skipped
