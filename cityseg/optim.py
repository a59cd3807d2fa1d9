"""Optimizer and learning-rate schedule registry entries.

A schedule builder returns a `Schedule`, which knows when its scheduler steps: after every
optimizer step (cosine), after every epoch (step), or after every epoch on the monitored
metric (plateau).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from cityseg.registry import OPTIMIZERS, SCHEDULERS, Params


class AdamWParams(Params):
    """AdamW (decoupled weight decay)."""

    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment coefficients")


@OPTIMIZERS.register("adamw", params=AdamWParams)
def adamw(p: AdamWParams, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter."""
    trainable = [t for t in model.parameters() if t.requires_grad]
    return torch.optim.AdamW(trainable, lr=p.lr, weight_decay=p.weight_decay, betas=p.betas)


@dataclass
class Schedule:
    """A learning-rate scheduler and when it steps: 'step', 'epoch' or 'metric' (per epoch)."""

    scheduler: (torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
                | None)
    interval: str

    def after_step(self) -> None:
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, monitored: float) -> None:
        if self.scheduler is None or self.interval == "step":
            return
        if self.interval == "metric":
            self.scheduler.step(monitored)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


class CosineParams(Params):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr, stepped every optimizer step."""

    warmup_epochs: float = Field(0.0, ge=0.0, description="epochs of linear warm-up from 0")
    min_lr_ratio: float = Field(
        0.01, ge=0.0, le=1.0, description="final lr as a fraction of the peak")


class StepParams(Params):
    """Multiply the lr by gamma every step_epochs epochs."""

    step_epochs: int = Field(5, ge=1, description="epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="decay factor")


class PlateauParams(Params):
    """Multiply the lr by factor when the monitored metric stops improving."""

    factor: float = Field(0.1, gt=0.0, lt=1.0, description="decay factor")
    patience: int = Field(2, ge=0, description="epochs without improvement before decaying")


class NoneParams(Params):
    """Constant learning rate."""


def cosine_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULERS.register("cosine", params=CosineParams)
def cosine(p: CosineParams, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
           epochs: int, mode: str) -> Schedule:
    """Per-step warm-up and cosine decay."""
    total, warmup = steps_per_epoch * epochs, round(p.warmup_epochs * steps_per_epoch)
    return Schedule(torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total=total, warmup=warmup,
                                              min_ratio=p.min_lr_ratio)), "step")


@SCHEDULERS.register("step", params=StepParams)
def step(p: StepParams, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
         epochs: int, mode: str) -> Schedule:
    """Step decay every step_epochs epochs."""
    return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, p.step_epochs, p.gamma), "epoch")


@SCHEDULERS.register("plateau", params=PlateauParams)
def plateau(p: PlateauParams, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
            epochs: int, mode: str) -> Schedule:
    """Decay when trainer.monitor plateaus."""
    return Schedule(torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=p.factor, patience=p.patience), "metric")


@SCHEDULERS.register("none", params=NoneParams)
def none(p: NoneParams, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
         epochs: int, mode: str) -> Schedule:
    """The optimizer's lr throughout."""
    return Schedule(None, "step")
