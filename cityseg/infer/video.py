"""Video in, video out: `predict drive.mp4` runs the model on every frame of a video file.

Frames are streamed: one is decoded, predicted by the same `predict_photo` as a photo, drawn
and encoded before the next is read, so memory stays the same for a video of any length.
The overlay (and with `--masks`, the mask in the task's colours) is written as H.264 in MP4 at
the source's frame rate and size; audio and every other stream are dropped. The heavy import,
PyAV (FFmpeg in its wheels), lives in this module only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from cityseg.errors import DataError, StorageError
from cityseg.runtime.files import written_whole
from cityseg.viz import overlay

if TYPE_CHECKING:
    from rich.progress import Progress

    from cityseg.infer.loading import Trained

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
CODEC = "libx264"  # in PyAV's wheels (mpeg4 too, but H.264 is half the size at equal quality)
# x264's constant quality; 18 is about where differences stop being visible (23 is its default)
CRF = "18"


def _pixel_format(width: int, height: int) -> str:
    """yuv420p, which every player plays, needs an even width and height (its colour planes are
    half size): an odd-sized video keeps its size in yuv444p, which ffmpeg, VLC and mpv play
    (browsers and QuickTime do not)."""
    return "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"


class _Encoder:
    """One output video, encoded into `partial` (runtime.files.written_whole renames it to
    `path` once complete: a failed or interrupted prediction leaves no half video there)."""

    def __init__(self, path: Path, partial: Path, *, rate: Fraction, width: int,
                 height: int) -> None:
        self.path = path
        try:
            self.container = av.open(str(partial), "w", format="mp4")
            self.stream = self.container.add_stream(CODEC, rate=rate, options={"crf": CRF})
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = _pixel_format(width, height)
        except av.FFmpegError as err:
            raise StorageError(f"{path}: cannot write ({err})") from None

    def write(self, rgb: np.ndarray | None) -> None:
        """One (H, W, 3) uint8 frame (converted to the stream's YUV by FFmpeg), or None to flush."""
        frame = None if rgb is None else av.VideoFrame.from_ndarray(rgb, format="rgb24")
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except av.FFmpegError as err:
            raise StorageError(f"{self.path}: cannot write ({err})") from None

    def finish(self) -> None:
        self.write(None)
        self.container.close()

    def discard(self) -> None:
        with contextlib.suppress(av.FFmpegError):
            self.container.close()


def _open(path: Path) -> tuple[av.container.InputContainer, av.VideoStream, Fraction]:
    """The file's first video stream and its frame rate; DataError naming the file if there is
    none or FFmpeg cannot read it."""
    try:
        source = av.open(str(path))
    except av.FFmpegError as err:
        raise DataError(f"{path}: not a readable video ({err.strerror or err})") from None
    if not source.streams.video:
        source.close()
        raise DataError(f"{path}: holds no video stream")
    stream = source.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        source.close()
        raise DataError(f"{path}: the video stream has no frame rate")
    stream.thread_type = "AUTO"  # FFmpeg's decoding threads
    return source, stream, Fraction(rate)


def _frame_count(source: av.container.InputContainer, stream: av.VideoStream,
                 rate: Fraction) -> int | None:
    """Frames in the stream: as the container says, else estimated from its duration; None
    when neither is known (the bar then shows no time left)."""
    if stream.frames:
        return stream.frames
    if stream.duration and stream.time_base:
        return round(stream.duration * stream.time_base * rate)
    if source.duration:
        return round(Fraction(source.duration, av.time_base) * rate)
    return None


def _frames(source: av.container.InputContainer, stream: av.VideoStream,
            path: Path) -> Iterator[np.ndarray]:
    """The decoded frames as (H, W, 3) uint8 RGB, one at a time."""
    frames = source.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.FFmpegError as err:
            raise DataError(f"{path}: unreadable video ({err.strerror or err})") from None
        yield frame.to_ndarray(format="rgb24")


class CutShort(DataError):
    """A video whose frames ran out before its header's count (cut short): what decoded was
    written to `written`, the overlay."""

    def __init__(self, message: str, written: Path) -> None:
        super().__init__(message)
        self.written = written


def predict_video(trained: Trained, path: Path, out: Path, stem: str, *, masks: bool,
                  progress: Progress | None = None) -> Path:
    """Write <stem>_overlay.mp4 (and with masks <stem>_mask.mp4) into `out`; returns the
    overlay's path. DataError naming the file when it is not a video FFmpeg can read;
    CutShort, after writing what decoded, when fewer frames decode than its header declares."""
    task = trained.task
    source, stream, rate = _open(path)
    declared = stream.frames  # read while the container is open (0: the header says none)
    kinds = ("overlay", "mask") if masks else ("overlay",)
    encoders: dict[str, _Encoder] = {}
    bar = (progress.add_task(f"{path.name} frames", total=_frame_count(source, stream, rate))
           if progress is not None else None)
    with contextlib.ExitStack() as written:  # each video renamed into place once complete
        try:
            with source:
                for done, photo in enumerate(_frames(source, stream, path), start=1):
                    if not encoders:  # the first frame gives the size
                        height, width = photo.shape[:2]
                        for kind in kinds:
                            target = out / f"{stem}_{kind}.mp4"
                            encoders[kind] = _Encoder(
                                target, written.enter_context(written_whole(target)), rate=rate,
                                width=width, height=height)
                    labels, _ = trained.predictor.predict_photo(photo)
                    encoders["overlay"].write(overlay(photo, labels, task))
                    if masks:
                        encoders["mask"].write(task.colors[labels])
                    if bar is not None:
                        progress.update(bar, completed=done)
            if not encoders:
                raise DataError(f"{path}: the video has no frames")
            if bar is not None:  # the count was an estimate from the duration, or unknown
                progress.update(bar, total=done)
            for encoder in encoders.values():
                encoder.finish()
        except BaseException:
            for encoder in encoders.values():
                encoder.discard()
            raise
    overlay_path = encoders["overlay"].path
    if declared and done < declared:
        raise CutShort(f"{path}: {done} of the {declared} frames its header declares "
                       f"decode (the file is cut short?); {overlay_path.name} holds those "
                       f"{done}", overlay_path)
    return overlay_path
