"""`cityseg predict drive.mp4`: a video in, the overlay (and mask) video out, frame by frame."""

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from rich.console import Console
from rich.progress import Progress

from cityseg import viz
from cityseg.cli import main
from cityseg.data.synthetic import render_scene
from cityseg.infer import files, loading
from tests.conftest import random_model

FRAMES, RATE = 12, 10
# Frames are compared as 2x2 block means, which yuv420p's chroma subsampling (colour kept per
# 2x2 block) leaves as they were; what remains is x264's loss at crf 18: 2 to 5 grey levels
# per pixel on these small, sharp-edged frames (measured), while the nearest wrong frame (one
# from another position of the video, or the photo without its overlay) is 20 or more away.
TOLERANCE = 8.0


def _blocks(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H // 2, W // 2, 3): the means of its 2x2 blocks (an odd last row or
    column dropped)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].astype(float).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two frames' 2x2 block means, in grey levels."""
    return float(np.abs(_blocks(a) - _blocks(b)).mean())


def write_video(path: Path, frames: list[np.ndarray], *, audio: bool) -> None:
    """H.264 at RATE frames/s (yuv444p when the size is odd), with a silent mono AAC track."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        if audio:  # every stream is added before the first packet
            sound = container.add_stream("aac", rate=8000, layout="mono")
            silence = av.AudioFrame.from_ndarray(
                np.zeros((1, 8000 * len(frames) // RATE), np.float32), format="fltp",
                layout="mono")
            silence.sample_rate = 8000
            container.mux([*sound.encode(silence), *sound.encode(None)])
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def read_video(path: Path) -> tuple[list[np.ndarray], Fraction, int]:
    """(frames as RGB, frame rate, number of audio streams)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, len(container.streams.audio)


def scenes(height: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render_scene(rng, height, width)[0] for _ in range(FRAMES)]


@pytest.mark.parametrize("size", [(64, 96), (63, 95)], ids=["even", "odd"])
def test_the_overlay_video_is_predict_on_every_frame_at_the_sources_rate_and_size(
        tmp_path, size):
    height, width = size
    model = random_model(tmp_path, "multiclass")
    write_video(tmp_path / "drive.mp4", scenes(height, width), audio=True)
    assert read_video(tmp_path / "drive.mp4")[2] == 1  # the source has its audio
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(model), str(tmp_path / "drive.mp4"),
                 "--out", str(out), "--masks"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["drive_mask.mp4", "drive_overlay.mp4"]
    # the reference: predict on the frames as decoded from the source (what the model saw)
    trained = loading.load_trained(run_id=None, checkpoint=model, runs=tmp_path / "runs")
    photos, _, _ = read_video(tmp_path / "drive.mp4")
    labels = [trained.predictor.predict_photo(photo)[0] for photo in photos]
    assert len(np.unique(np.stack(labels))) >= 3  # a prediction that varies over the frame
    expected = {"overlay": [viz.overlay(photo, lb, trained.task)
                            for photo, lb in zip(photos, labels, strict=True)],
                "mask": [trained.task.colors[lb] for lb in labels]}
    for kind, wanted in expected.items():
        frames, rate, audio = read_video(out / f"drive_{kind}.mp4")
        assert (len(frames), frames[0].shape, rate, audio) == (FRAMES, (height, width, 3),
                                                               RATE, 0)
        # error[i, j]: written frame i against expected frame j
        error = np.array([[_difference(f, w) for w in wanted] for f in frames])
        assert error.diagonal().max() < TOLERANCE, (kind, error.diagonal())
        assert (error.argmin(axis=1) == np.arange(FRAMES)).all()  # each nearest its own frame
        if kind == "overlay":  # and the overlay is drawn
            bare = [_difference(f, p) for f, p in zip(frames, photos, strict=True)]
            assert min(bare) > 2 * TOLERANCE, bare


@pytest.mark.parametrize("suffix", ["mov", "mkv"])  # mkv: no frame count, only a duration
def test_the_bar_knows_the_frames_to_come_from_the_container(tmp_path, suffix):
    model = random_model(tmp_path, "binary")
    write_video(tmp_path / f"drive.{suffix}", scenes(32, 48), audio=False)
    trained = loading.load_trained(run_id=None, checkpoint=model, runs=tmp_path / "runs")
    announced = {}

    class Recording(Progress):
        def add_task(self, description, *args, total=None, **kwargs):
            announced[description] = total
            return super().add_task(description, *args, total=total, **kwargs)

    progress = Recording(*files.progress_bar(Console()).columns,
                         console=Console(file=io.StringIO()))
    with progress:
        written, skipped = files.predict_files(trained, [tmp_path], tmp_path / "out",
                                                   probabilities=False, progress=progress)
    assert written == [tmp_path / "out" / "drive_overlay.mp4"] and not skipped
    assert announced[f"drive.{suffix} frames"] == FRAMES  # before the first frame: time left
    (frames,) = [t for t in progress.tasks if t.description == f"drive.{suffix} frames"]
    assert frames.completed == FRAMES


def test_an_unreadable_video_is_named_skipped_and_leaves_no_partial_file(tmp_path, capsys):
    model = random_model(tmp_path, "binary")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "good.mp4", scenes(32, 48), audio=False)
    (inputs / "noise.mkv").write_bytes(b"not a video at all" * 100)
    (inputs / "truncated.mp4").write_bytes((inputs / "good.mp4").read_bytes()[:600])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(model), str(inputs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 input(s) skipped" in err
    for name in ("noise.mkv", "truncated.mp4"):
        assert f"skipped: {inputs / name}: not a readable video (" in err
    assert sorted(p.name for p in out.iterdir()) == ["good_overlay.mp4"]


def test_a_video_cut_short_is_written_as_far_as_it_decodes_and_said_to_be_incomplete(
        tmp_path, capsys):
    # faststart: the frame count sits before the frames, so cutting the file leaves a header
    # that promises more frames than remain
    model = random_model(tmp_path, "binary")
    whole = tmp_path / "whole.mp4"
    height, width = 32, 48
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in scenes(height, width) * 3:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    cut = tmp_path / "in" / "drive.mp4"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(model), str(cut), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    decoded = len(read_video(out / "drive_overlay.mp4")[0])
    assert 0 < decoded < 3 * FRAMES
    assert (f"incomplete: {cut}: {decoded} of the {3 * FRAMES} frames its header declares "
            f"decode (the file is cut short?); drive_overlay.mp4 holds those {decoded}") in err
    assert "skipped" not in err and "Traceback" not in err
