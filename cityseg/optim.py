"""Optimizer and learning-rate schedule registry entries."""

from __future__ import annotations

import math

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


class CosineParams(Params):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr, stepped every batch."""

    warmup_epochs: float = Field(0.0, ge=0.0, description="epochs of linear warm-up from 0")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="final lr as a fraction of the peak")


class ConstantParams(Params):
    """Constant learning rate."""


def cosine_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULERS.register("cosine", params=CosineParams)
def cosine(p: CosineParams, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
           epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step warm-up and cosine decay."""
    total, warmup = steps_per_epoch * epochs, round(p.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total=total, warmup=warmup, min_ratio=p.min_lr_ratio))


@SCHEDULERS.register("constant", params=ConstantParams)
def constant(p: ConstantParams, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
             epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The optimizer's lr throughout."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
