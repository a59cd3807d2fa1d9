"""The experiment file's schema: one Pydantic model per section, components from the registries.

What a valid experiment is (types, ranges, cross-field rules) lives here; reading files,
`base:` inheritance and `--set` overrides live in `loading`, and error messages in `errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

# Importing the component packages fills the registries that the unions below are made of.
from cityseg import data, losses, models, optim  # noqa: F401
from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.tasks import TASKS, Task
from cityseg.data.transforms import device_problem
from cityseg.metrics import lower_is_better
from cityseg.registry import (
    AUGMENTATIONS,
    DATASETS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    BuildContext,
    Registry,
    suggest,
)

# validation context of a config saved by an earlier version (a checkpoint's, a run's
# config.yaml): keys retired since then are dropped instead of refused
SAVED = "saved"


class Section(BaseModel):
    """A section of the file: unknown keys are errors, values never change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InferenceConfig(Section):
    """How validation, evaluate, calibrate and predict turn a frame into logits."""

    mode: Literal["whole", "slide"] = Field(
        "whole", description="whole: the frame (at data.scale) in one pass; slide: windows of "
                             "data.image_size over it, overlapping logits averaged")
    overlap: float = Field(1 / 3, ge=0.0, lt=1.0,
                           description="slide: fraction of a window its neighbour overlaps")
    tta: Literal["none", "flip"] = Field(
        "none", description="flip: average the logits of the frame and of its mirror image")

    def describe(self) -> str:
        """E.g. `slide (overlap 0.33) + flip`: what the run's metrics come from."""
        text = f"slide (overlap {self.overlap:.2g})" if self.mode == "slide" else "whole"
        return text + (" + flip" if self.tta == "flip" else "")


class TrainerConfig(Section):
    """How to train."""

    epochs: int = Field(15, ge=1, description="passes over the training set")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="autocast precision; auto: bf16 where the hardware has native bf16 "
                            "(CUDA, recent CPUs), else fp32; fp16 adds a gradient scaler")
    channels_last: bool = Field(
        True, description="NHWC memory layout, faster convolutions on GPUs and CPUs")
    compile: bool = Field(
        False, description="torch.compile the model (slow first epoch, faster later ones)")
    deterministic: bool = Field(
        False, description="deterministic algorithms: identical metrics across runs, maybe slower")
    grad_clip_norm: float = Field(
        0.0, ge=0.0, description="clip the gradient norm to this; 0 disables")
    accumulate: int = Field(
        1, ge=1, description="batches whose gradients are summed per optimizer step")
    threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="foreground where sigmoid(logit) > threshold")
    boundary_tolerance_diagonal: float = Field(
        0.0075, ge=0.0, lt=1.0,
        description="how far a class's predicted contour may lie from the true one and still "
                    "count, for val/bf_score, as a fraction of the image diagonal (0.0075 = "
                    "0.75%, Csurka et al. 2013): the same at any resolution scored")

    @model_validator(mode="before")
    @classmethod
    def _retired_pixel_tolerance(cls, section: Any, info: ValidationInfo) -> Any:
        """boundary_tolerance (pixels, for the retired val/boundary_f1): a config saved before
        the BF score (a checkpoint's, a run's config.yaml) loads without it, as nothing is
        scored with it now; an experiment file that sets it is told what replaced it."""
        if not isinstance(section, dict) or "boundary_tolerance" not in section:
            return section
        if SAVED in (info.context or {}):
            return {k: v for k, v in section.items() if k != "boundary_tolerance"}
        raise ValueError("boundary_tolerance (pixels, for the retired val/boundary_f1) is gone: "
                         "set boundary_tolerance_diagonal, a fraction of the image diagonal "
                         "(0.0075 = 0.75%), for val/bf_score")

    monitor: str = Field(
        "auto", description="metric that picks the best checkpoint, drives early stopping and "
                            "the plateau scheduler; auto: val/dice for binary, val/miou for "
                            "multiclass")
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="whether the monitored metric should rise or fall; auto: min for "
                            "losses, else max")
    patience: int = Field(
        0, ge=0, description="stop after this many epochs without improvement; 0 disables")
    min_delta: float = Field(
        0.0, ge=0.0, description="smallest change that counts as an improvement")
    checkpoint_minutes: float = Field(
        10.0, ge=0.0, description="also write last.pt mid-epoch, at the next optimizer step once "
                                  "this many minutes have passed, so a crash loses minutes, not "
                                  "an epoch; 0: at epoch ends only")
    sync_bn: bool | Literal["auto"] = Field(
        "auto", description="SyncBatchNorm across processes (torchrun): auto = on CUDA with more "
                            "than one process and model.norm batch; it does not exist on the CPU")
    inference: InferenceConfig = Field(default_factory=InferenceConfig,
                                       description=InferenceConfig.__doc__)


class TrackingConfig(Section):
    """Where and how the run is recorded."""

    experiment: str = Field("cityseg", min_length=1, description="MLflow experiment name")
    dir: Path = Field(
        Path("runs"), description="root of all outputs: mlflow.db, artifacts/, checkpoints/")
    num_samples: int = Field(4, ge=0, description="validation images in the per-epoch sample panel")
    uri: str | None = Field(
        None, description="MLflow tracking URI (a server: http://host:5000); --tracking-uri and "
                          "MLFLOW_TRACKING_URI take precedence; none: sqlite:///<dir>/mlflow.db")
    outage_minutes: float = Field(
        10.0, ge=0.0, description="how long a tracking server may stay silent: training goes on "
                                  "and what it logs is kept and sent when the server answers; "
                                  "past this the run stops with a checkpoint that --resume "
                                  "finishes")
    upload_checkpoints: bool | Literal["auto"] = Field(
        "auto", description="upload last.pt (and a new best.pt) as artifacts at every epoch end, "
                            "so another machine can resume; auto: with a remote store")
    system_metrics: bool = Field(True, description="log CPU, memory, disk and GPU use "
                                                   "(system/...) with MLflow's monitor")
    log_model: bool = Field(
        True, description="log the best model at the end as a servable MLflow pyfunc (uint8 "
                          "images in, masks out), with its validation metrics")
    register_model: str | None = Field(
        None, pattern=r"^[\w.-]+$", description="register the logged model in the MLflow model "
                                               "registry under this name")


DEFAULT_COMPONENTS = {"model": "unet", "loss": "weighted_bce", "optimizer": "adamw",
                      "scheduler": "cosine"}


def _default(registry: Registry, field: str) -> Any:
    name = DEFAULT_COMPONENTS[field]
    return Field(default_factory=lambda: registry.get(name).params(name=name),
                 description=f"{registry.kind}: one of {', '.join(registry.names())}")


class Experiment(Section):
    """One experiment file, fully resolved."""

    name: str = Field(min_length=1, pattern=r"^[\w.-]+$",
                      description="run name (letters, digits, _ . -)")
    description: str | None = Field(
        None, description="what this experiment tries; the MLflow run's description")
    seed: int = Field(42, description="seed of every random number generator")
    data: DATASETS.union() = Field(description=f"dataset: one of {', '.join(DATASETS.names())}")
    augment: list[AUGMENTATIONS.union()] = Field(
        [], description="training augmentations, applied in order to image and mask together")
    model: MODELS.union() = _default(MODELS, "model")
    loss: LOSSES.union() = _default(LOSSES, "loss")
    optimizer: OPTIMIZERS.union() = _default(OPTIMIZERS, "optimizer")
    scheduler: SCHEDULERS.union() = _default(SCHEDULERS, "scheduler")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig,
                                   description=TrainerConfig.__doc__)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description=TrackingConfig.__doc__)

    @model_validator(mode="after")
    def _image_size_fits_model(self) -> Experiment:
        divisor = self.model.input_divisor
        if any(side % divisor for side in self.data.image_size):
            raise ValueError(f"data.image_size {list(self.data.image_size)} must be divisible by "
                             f"2**model.depth = {divisor}")
        frame = self.data.frame_size
        if frame != tuple(self.data.image_size):
            if self.trainer.inference.mode == "whole" and any(s % divisor for s in frame):
                raise ValueError(f"data.scale {list(frame)} must be divisible by 2**model.depth "
                                 f"= {divisor} for trainer.inference.mode whole (or use slide)")
            if not any(a.name in ("random_crop", "random_resized_crop") for a in self.augment):
                raise ValueError(f"data.scale {list(frame)} differs from data.image_size "
                                 f"{list(self.data.image_size)}: training samples must be cut "
                                 f"to image_size; add random_crop (after random_scale) or "
                                 f"random_resized_crop to augment")
        if self.data.augment_on == "device" and (problem := device_problem(self.augment)):
            raise ValueError(f"data.augment_on: device: {problem}")
        return self

    @model_validator(mode="after")
    def _loss_and_monitor_fit_task(self) -> Experiment:
        task = self.data.task
        if task not in self.loss.tasks:
            fitting = [n for n in LOSSES.names() if task in LOSSES.get(n).params.tasks]
            raise ValueError(f"loss.name: {self.loss.name} is a loss for the "
                             f"{' or '.join(self.loss.tasks)} task but data.task is {task}; "
                             f"use one of {', '.join(fitting)}")
        self.loss.check_fits(self.build_context())
        allowed = self.task.monitors
        if self.trainer.monitor not in ("auto", *allowed):
            raise ValueError(f"trainer.monitor: {self.trainer.monitor} is not a per-epoch metric "
                             f"of the {task} task{suggest(self.trainer.monitor, list(allowed))}; "
                             f"use auto, {', '.join(allowed)}")
        return self

    @property
    def monitor(self) -> str:
        """The metric that picks the best checkpoint, with auto resolved for the task."""
        if self.trainer.monitor != "auto":
            return self.trainer.monitor
        return self.task.monitors[0]

    @property
    def monitor_mode(self) -> str:
        """max or min, with auto resolved: losses fall, scores rise."""
        if self.trainer.mode != "auto":
            return self.trainer.mode
        return "min" if lower_is_better(self.monitor) else "max"

    @property
    def task(self) -> Task:
        """The entry of the task table for data.task."""
        return TASKS[self.data.task]

    def build_context(self) -> BuildContext:
        """What component builders may know about this experiment besides their own params."""
        return BuildContext(task=self.data.task, out_channels=self.task.out_channels,
                            ignore_index=IGNORE_INDEX, image_size=self.data.image_size,
                            seed=self.seed, frame_size=self.data.frame_size)


REGISTRY_FIELDS = {"data": DATASETS, "augment": AUGMENTATIONS, "model": MODELS,
                   "loss": LOSSES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
