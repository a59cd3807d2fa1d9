"""The one inference path: uint8 images -> model inputs -> logits -> labels, and their scores.

Training, validation, evaluate, calibrate, predict and the sweep's side-by-side panel all go
through a Predictor, so they cannot drift apart: the same normalisation (on the device), memory
layout, autocast precision, threshold and resizing everywhere. A photo of any size is resized
to the training size as the data pipeline resizes (PIL bilinear), and its logits are upsampled
bilinearly to the photo's size before they become labels: what `predict` writes is exactly what
`evaluate --full-resolution` scores.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cityseg.config import Experiment, InferenceConfig
from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.tasks import Task
from cityseg.metrics import BoundaryScores, ConfusionMatrix, boundary_scores
from cityseg.models.encoders import IMAGENET_MEAN, IMAGENET_STD, normalisation
from cityseg.runtime import distributed
from cityseg.runtime.device import resolve_device, resolve_precision

# ------------------------------------------------------------------ the predict path's steps
# pure torch ops, shared with the exported graph (deploy/export.py): a change to normalisation
# or flip averaging reaches both


@functools.lru_cache(maxsize=8)
def statistics(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's mean and std (of 0..1 values) as (1, 3, 1, 1) tensors of 0..255 values on
    the device, made once rather than per batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalised(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB values 0..255 -> the model's input (`statistics` gives mean and std)."""
    return (images.float() - mean) / std


def flip_averaged(logits_of, x: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the logits of x averaged with the mirrored logits of its
    mirror image."""
    return (logits_of(x).float() + logits_of(x.flip(-1)).float().flip(-1)) / 2


def at_size(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, C, h, w) logits upsampled bilinearly (align_corners=False) to size (H, W)."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def place_model(model: nn.Module, exp: Experiment, device: str | torch.device) -> nn.Module:
    """The model moved (in place) to the device, in the memory layout trainer.channels_last
    asks for: the step before `Predictor.for_experiment`."""
    layout = torch.channels_last if exp.trainer.channels_last else torch.contiguous_format
    return model.to(resolve_device(str(device)), memory_format=layout)


def _check_placed(model: nn.Module, device: torch.device) -> None:
    """ValueError when some weight of the model lies on another device than the predictor's."""
    here = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as weights report it
    elsewhere = {str(t.device) for t in (*model.parameters(), *model.buffers()) if t.device != here}
    if elsewhere:
        raise ValueError(f"the model is on {', '.join(sorted(elsewhere))}, the predictor on "
                         f"{here}: place_model(model, exp, device) first")


class Predictor:
    """A model with everything that decides what it predicts: device, precision, memory layout,
    task, threshold and the image size it was trained at."""

    def __init__(self, *, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                 channels_last: bool, task: Task, threshold: float,
                 image_size: tuple[int, int], frame_size: tuple[int, int] | None = None,
                 inference: InferenceConfig | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.mean, self.std = tuple(mean), tuple(std)  # the encoder's input normalisation
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.task, self.threshold, self.image_size = task, threshold, tuple(image_size)
        # frames (validation, photos) are predicted at this size: data.scale, else image_size
        self.frame_size = tuple(frame_size or image_size)
        self.inference = inference or InferenceConfig()

    @classmethod
    def for_experiment(cls, exp: Experiment, model: nn.Module, *,
                       device: str | torch.device | None = None, threshold: float | None = None,
                       inference: InferenceConfig | None = None) -> Predictor:
        """The predictor an experiment trains and validates with, around a model already on the
        device (`place_model`); device overrides trainer.device, inference trainer.inference."""
        dev = resolve_device(str(device or exp.trainer.device))
        _check_placed(model, dev)
        mean, std = normalisation(exp.model.encoder)
        return cls(model=model, device=dev, amp_dtype=resolve_precision(exp.trainer.precision, dev),
                   channels_last=exp.trainer.channels_last, task=exp.task,
                   threshold=exp.trainer.threshold if threshold is None else threshold,
                   image_size=exp.data.image_size, frame_size=exp.data.frame_size,
                   inference=inference or exp.trainer.inference, mean=mean, std=std)

    def with_model(self, model: nn.Module) -> Predictor:
        """The same settings around another module (the DDP-wrapped one that trains)."""
        other = copy.copy(self)
        other.model = model
        return other

    # ------------------------------------------------------------------ steps

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> normalised float on the device, in the model's memory layout."""
        mean, std = statistics(self.mean, self.std, self.device)
        x = normalised(images.to(self.device, non_blocking=True), mean, std)
        return x.contiguous(memory_format=self.memory_format)

    def targets(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, H, W) uint8 labels -> long on the device."""
        return masks.to(self.device, non_blocking=True).long()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits under autocast (gradients flow if the caller allows them)."""
        autocast = (contextlib.nullcontext() if self.amp_dtype is None
                    else torch.autocast(device_type=self.device.type, dtype=self.amp_dtype))
        with autocast:
            return self.model(x)

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalised frames of any size, at their size, as trainer.inference says:
        the whole frame in one pass, or windows of the training size (overlapping logits
        averaged); with flip, averaged with the logits of the mirror image."""
        if self.inference.tta == "flip":
            return flip_averaged(self._frame_logits, x)
        return self._frame_logits(x)

    def _frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.image_size
        if self.inference.mode == "whole" or tuple(x.shape[-2:]) == (height, width):
            return self.logits(x)
        rows, cols = x.shape[-2:]
        # a frame smaller than a window: padded with zeros (the mean colour), cropped after
        x = F.pad(x, (0, max(0, width - cols), 0, max(0, height - rows)))
        tops = _starts(x.shape[-2], height, self.inference.overlap)
        lefts = _starts(x.shape[-1], width, self.inference.overlap)
        total = None
        count = torch.zeros((1, 1, *x.shape[-2:]), device=x.device)
        for top in tops:
            windows = torch.cat([x[..., top : top + height, left : left + width]
                                 for left in lefts])  # one row of windows per forward pass
            out = self.logits(windows.contiguous(memory_format=self.memory_format)).float()
            if total is None:
                total = torch.zeros((x.shape[0], out.shape[1], *x.shape[-2:]), device=x.device)
            for i, left in enumerate(lefts):
                total[..., top : top + height, left : left + width] += out[
                    i * len(x) : (i + 1) * len(x)]
                count[..., top : top + height, left : left + width] += 1
        return (total / count)[..., :rows, :cols]

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits -> (B, H, W) labels of the task at this threshold."""
        return self.task.labels(logits, threshold=self.threshold)

    # ------------------------------------------------------------------ inference

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 frames -> (B, H, W) labels on the device."""
        self.model.eval()
        return self.labels(self.frame_logits(self.inputs(images)))

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 frames -> (B, H, W) foreground probability."""
        self.model.eval()
        return self.task.probabilities(self.frame_logits(self.inputs(images)))

    @torch.inference_mode()
    def photo_logits(self, photo: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 photo of any size -> (1, C, H, W) float logits at the photo's size:
        resized (PIL bilinear, as the data pipeline resizes) to the frame size, predicted as
        trainer.inference says, upsampled back."""
        self.model.eval()
        height, width = self.frame_size
        small = np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
        frame = torch.from_numpy(small.copy()).permute(2, 0, 1)[None]
        return at_size(self.frame_logits(self.inputs(frame)), photo.shape[:2])

    @torch.inference_mode()
    def predict_photo(self, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W, 3) uint8 photo -> (labels at its size, foreground probability or None)."""
        logits = self.photo_logits(photo)
        labels = self.labels(logits)[0].cpu().numpy().astype(np.uint8)
        if not self.task.thresholded:
            return labels, None
        return labels, self.task.probabilities(logits)[0].cpu().numpy()

    # ------------------------------------------------------------------ scores

    @torch.inference_mode()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 tolerance: float, loss_fn: nn.Module | None = None,
                 frames: list[np.ndarray] | None = None) -> tuple[dict[str, float], torch.Tensor]:
        """Scores (with `loss` if loss_fn is given) and confusion counts over batches of
        (uint8 frames, masks); each frame's own counts appended to `frames` if given."""
        self.model.eval()
        tally = _ScoreTally(self.task, tolerance=tolerance, device=self.device,
                            keep_frames=frames is not None)
        for images, masks in batches:
            logits, y = self.frame_logits(self.inputs(images)), self.targets(masks)
            loss = loss_fn(logits, y) if loss_fn is not None else None
            tally.add(self.labels(logits), y, loss=loss)
        return tally.result(with_loss=loss_fn is not None, frames=frames)

    @torch.inference_mode()
    def evaluate_photos(self, samples: Iterable[tuple[np.ndarray, np.ndarray]], *,
                        tolerance: float, frames: list[np.ndarray] | None = None
                        ) -> tuple[dict[str, float], torch.Tensor]:
        """Scores and confusion counts over (photo, labels) pairs of any size, predicted exactly
        as predict_photo predicts them (full-resolution evaluation); each frame's own counts
        appended to `frames` if given."""
        tally = _ScoreTally(self.task, tolerance=tolerance, device=self.device,
                            keep_frames=frames is not None)
        for photo, labels in samples:
            pred = self.labels(self.photo_logits(photo))
            tally.add(pred, self.targets(torch.from_numpy(labels)[None]))
        return tally.result(with_loss=False, frames=frames)


def _starts(length: int, window: int, overlap: float) -> list[int]:
    """Window offsets along one side: a stride of window * (1 - overlap), the last window
    flush with the end."""
    stride = max(1, round(window * (1 - overlap)))
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


class _ScoreTally:
    """Confusion, boundary and loss counts of a dataset, kept on the device; one host copy."""

    def __init__(self, task: Task, *, tolerance: float, device: torch.device,
                 keep_frames: bool = False) -> None:
        self.task = task
        self.confusion = ConfusionMatrix(task.num_classes, ignore_index=IGNORE_INDEX, device=device,
                                         keep_frames=keep_frames)
        # tolerance: the BF score's, a fraction of the image diagonal
        self.boundary = BoundaryScores(task.num_classes, tolerance=tolerance,
                                       ignore_index=IGNORE_INDEX, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor, *, loss: torch.Tensor | None = None
            ) -> None:
        self.confusion.update(pred, target)
        self.boundary.update(pred, target)
        if loss is not None:
            self.loss_sum += loss.double() * len(target)
        self.seen += len(target)

    def result(self, *, with_loss: bool, frames: list[np.ndarray] | None = None
               ) -> tuple[dict[str, float], torch.Tensor]:
        """The scores and counts of every rank together; this rank's frames' counts appended
        to `frames` (host arrays)."""
        if frames is not None and self.confusion.frames:
            frames.extend(torch.cat(self.confusion.frames).cpu().numpy())
        n = self.task.num_classes
        seen = torch.full((1,), float(self.seen), dtype=torch.float64, device=self.loss_sum.device)
        packed = torch.cat([seen, self.loss_sum.view(1), self.confusion.counts.double().flatten(),
                            self.boundary.counts.double()])
        # summed over the ranks that shared the data (a no-op for one process), then one copy;
        # float64 holds counts below 2**53 exactly
        host = distributed.all_reduce(packed, "sum").cpu()
        counts = host[2 : 2 + n * n].long().view(n, n)
        found = {**self.task.scores(counts), **boundary_scores(host[2 + n * n :])}
        if with_loss:
            found = {"loss": host[1].item() / max(host[0].item(), 1), **found}
        return found, counts
