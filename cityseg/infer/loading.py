"""A trained model, loaded: from a run (its local checkpoint, else the copy in its artifacts)
or a checkpoint file, inside the Predictor it was trained with; and its masks for image arrays
(the served model's path)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cityseg import checkpoints, tracking
from cityseg.config import Experiment, apply_overrides, validate
from cityseg.data.tasks import Task
from cityseg.errors import CitysegError
from cityseg.infer.predictor import Predictor, place_model
from cityseg.registry import MODELS


@dataclass
class Trained:
    """A model ready for inference, with the experiment it was trained by."""

    exp: Experiment
    predictor: Predictor  # threshold: the calibrated one if the checkpoint has it
    checkpoint: dict
    path: Path
    run_id: str
    note: str | None = None  # the local checkpoint could not be used: which copy was instead

    @property
    def task(self) -> Task:
        return self.exp.task

    @property
    def threshold(self) -> float:
        return self.predictor.threshold


def load_trained(*, run_id: str | None, checkpoint: Path | None, runs: Path,
                 overrides: list[str] | tuple[str, ...] = (), device: str = "auto",
                 which: checkpoints.Which = "best", uri: str | None = None) -> Trained:
    """A run's best (or last) checkpoint, local else the run's artifact in the store at `uri`
    (its tracking.uri; None: MLFLOW_TRACKING_URI or the store under `runs`), or a checkpoint
    file, as a model whose weights fit, on the device, inside its Predictor."""
    if (run_id is None) == (checkpoint is None):
        raise CitysegError("give --run RUN_ID or --checkpoint PATH (one of them)")
    if checkpoint is not None:
        found = checkpoints.Fetched(checkpoint, checkpoints.load(checkpoint))
    else:
        found = checkpoints.intact(runs, run_id, which,
                                    copies=tracking.run_artifacts(runs, run_id, uri=uri))
    path, saved = found.path, found.checkpoint
    raw = apply_overrides(copy.deepcopy(saved["config"]), overrides)
    exp = validate(raw, source=f"config of checkpoint {path}", saved=True)
    model = MODELS.build(exp.model, exp.build_context())
    checkpoints.check_weights_fit(saved, model, path)
    asked = any(o.startswith("trainer.threshold=") for o in overrides)
    # a threshold is in the checkpoint only once `evaluate --calibrate --write-threshold` put it
    threshold = float(saved["threshold"]) if "threshold" in saved and not asked else None
    model = place_model(model.eval(), exp, device)
    predictor = Predictor.for_experiment(exp, model, device=device, threshold=threshold)
    return Trained(exp, predictor, saved, path, saved["run_id"], found.note)


def _as_uint8(images: np.ndarray) -> np.ndarray:
    """Whole values 0..255 as uint8; others refused (a cast would wrap 16-bit values and turn
    0..1 floats black)."""
    if images.dtype == np.uint8:
        return images
    numeric = images.dtype.kind in "iuf"
    whole = numeric and np.array_equal(images, np.round(images))
    if not whole or (images.size and (images.min() < 0 or images.max() > 255)):
        found = f" with values {images.min()}..{images.max()}" if numeric and images.size else ""
        raise CitysegError(f"expected RGB images with whole values 0..255 (uint8), "
                           f"got {images.dtype}{found}")
    return images.astype(np.uint8)


def predict_masks(trained: Trained, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 photos -> (N, H, W) uint8 masks as predict writes them."""
    images = _as_uint8(np.asarray(images))
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise CitysegError(f"expected uint8 RGB images of shape (N, H, W, 3), got {images.shape}")
    return np.stack([trained.task.mask_values[trained.predictor.predict_photo(image)[0]]
                     for image in images])
