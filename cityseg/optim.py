"""Optimizer and learning-rate schedule registry entries.

A schedule builder returns a `Schedule`, which knows when its scheduler steps: after every
optimizer step (cosine), after every epoch (step), or after every epoch on the monitored
metric (plateau).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from cityseg.errors import ConfigError
from cityseg.registry import OPTIMIZERS, SCHEDULERS, Params


class AdamWParams(Params):
    """AdamW (decoupled weight decay)."""

    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment coefficients")
    encoder_lr_mult: float = Field(
        1.0, gt=0.0, description="the encoder's learning rate as a multiple of lr (e.g. 0.1 to "
                                 "fine-tune a pretrained encoder gently); needs model.encoder")
    decay_norm_and_bias: Literal["auto"] | bool = Field(
        "auto", description="weight decay on normalisation weights and biases too; auto: no "
                            "with a pretrained-style encoder (the usual AdamW convention), yes "
                            "with the plain U-Net (as it always trained)")


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The model's pretrained-style encoder (model.encoder), or None for the plain U-Net,
    which has no separate one."""
    return getattr(model, "encoder", None)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, encoder_lr_mult: float,
                 decay_norm_and_bias: bool) -> list[dict]:
    """The model's trainable parameters in named groups: the encoder (if the model has one,
    at lr * encoder_lr_mult) and the rest, each split into decayed weights and undecayed norm
    weights and biases when asked. Empty groups are left out."""
    encoder = encoder_of(model)
    in_encoder = {id(t) for t in encoder.parameters()} if encoder is not None else set()
    undecayed = set()
    if not decay_norm_and_bias:
        for module in model.modules():
            for name, tensor in module.named_parameters(recurse=False):
                if isinstance(module, _NORMS) or name == "bias":
                    undecayed.add(id(tensor))
    groups: dict[str, dict] = {}
    for tensor in model.parameters():
        part = "encoder" if id(tensor) in in_encoder else "decoder" if in_encoder else "model"
        decayed = id(tensor) not in undecayed
        name = part if decayed else f"{part}_no_decay"
        group = groups.setdefault(name, {
            "name": name, "params": [],
            "lr": lr * (encoder_lr_mult if part == "encoder" else 1.0),
            "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(tensor)
    return list(groups.values())


@OPTIMIZERS.register("adamw", params=AdamWParams)
def adamw(p: AdamWParams, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over every parameter (a frozen encoder's too: it trains once unfrozen)."""
    has_encoder = encoder_of(model) is not None
    if p.encoder_lr_mult != 1.0 and not has_encoder:
        raise ConfigError("optimizer.encoder_lr_mult: the plain U-Net has no separate encoder; "
                          "set model.encoder to a pretrained-style one, or leave it at 1")
    decay = not has_encoder if p.decay_norm_and_bias == "auto" else p.decay_norm_and_bias
    groups = param_groups(model, lr=p.lr, weight_decay=p.weight_decay,
                          encoder_lr_mult=p.encoder_lr_mult, decay_norm_and_bias=decay)
    return torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay, betas=p.betas)


def describe_groups(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Each param group's size, configured lr and weight decay, for the run's record: the lr
    a schedule starts from (`initial_lr`), not where a warm-up has put it at this step."""
    return {g.get("name", str(i)): {"tensors": len(g["params"]),
                                    "parameters": sum(t.numel() for t in g["params"]),
                                    "lr": g.get("initial_lr", g["lr"]),
                                    "weight_decay": g["weight_decay"]}
            for i, g in enumerate(optimizer.param_groups)}


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
