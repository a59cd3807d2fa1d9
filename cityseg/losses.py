"""Losses: logits (B, C, H, W) and targets (B, H, W) holding class indices or the ignore index.

Binary losses take one logit channel and targets in {0, 1, ignore}; cross_entropy takes one
channel per class. Each loss is averaged over the non-ignored pixels of the whole batch and
computed in float32, whatever the autocast precision of the forward pass. Each params model
names the tasks it fits, so a loss that does not fit `data.task` is a config error.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from cityseg.errors import ConfigError
from cityseg.registry import LOSSES, BuildContext, Params


def _binary_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """(logits (B, H, W) float32, target in {0., 1.}, valid mask) from the raw batch."""
    if logits.shape[1] != 1:
        raise ValueError(f"binary losses expect 1 logit channel, got {logits.shape[1]}")
    valid = target != ignore_index
    return logits[:, 0].float(), (target == 1).float(), valid


class WeightedBCE(nn.Module):
    """Binary cross-entropy with logits; foreground pixels weigh `pos_weight` times as much."""

    def __init__(self, *, pos_weight: float, ignore_index: int) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t, valid = _binary_inputs(logits, target, self.ignore_index)
        per_pixel = F.binary_cross_entropy_with_logits(x, t, pos_weight=self.pos_weight,
                                                       reduction="none")
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


class SoftDice(nn.Module):
    """1 - soft Dice of sigmoid probabilities over the batch: 1 - (2|P.T| + s) / (|P| + |T| + s)."""

    def __init__(self, *, smooth: float, ignore_index: int) -> None:
        super().__init__()
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t, valid = _binary_inputs(logits, target, self.ignore_index)
        p = torch.sigmoid(x) * valid
        t = t * valid
        dice = (2 * (p * t).sum() + self.smooth) / (p.sum() + t.sum() + self.smooth)
        return 1 - dice


class BCEDice(nn.Module):
    """bce_weight * WeightedBCE + dice_weight * SoftDice."""

    def __init__(self, *, bce: WeightedBCE, dice: SoftDice, bce_weight: float,
                 dice_weight: float) -> None:
        super().__init__()
        self.bce, self.dice = bce, dice
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.bce_weight * self.bce(logits, target)
                + self.dice_weight * self.dice(logits, target))


class BinaryFocal(nn.Module):
    """Focal loss (Lin et al., 2017): -a_t (1 - p_t)^gamma log(p_t); a_t = alpha for foreground."""

    def __init__(self, *, alpha: float, gamma: float, ignore_index: int) -> None:
        super().__init__()
        self.alpha, self.gamma, self.ignore_index = alpha, gamma, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t, valid = _binary_inputs(logits, target, self.ignore_index)
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # -log(p_t)
        p_t = torch.exp(-bce)
        alpha_t = self.alpha * t + (1 - self.alpha) * (1 - t)
        per_pixel = alpha_t * (1 - p_t) ** self.gamma * bce
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


class CrossEntropy(nn.Module):
    """Softmax cross-entropy over C classes with optional class weights and label smoothing."""

    def __init__(self, *, weight: torch.Tensor | None, label_smoothing: float,
                 ignore_index: int) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target.long(), weight=self.weight,
                               ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)


PosWeight = Field(1.0, description="weight of foreground pixels relative to background; auto = the "
                  "background/foreground pixel ratio of the training split")


def _positive_or_auto(cls, value: float | str) -> float | str:
    if value != "auto" and value <= 0:
        raise ValueError("pos_weight must be > 0 or auto")
    return value
Smooth = Field(1.0, ge=0.0, description="added to numerator and denominator of Dice; keeps empty "
               "masks finite")


class BinaryLossParams(Params):
    tasks: ClassVar[tuple[str, ...]] = ("binary",)


class WeightedBCEParams(BinaryLossParams):
    """Weighted binary cross-entropy: the original project's loss."""

    pos_weight: float | Literal["auto"] = PosWeight
    _check = field_validator("pos_weight")(classmethod(_positive_or_auto))


class DiceParams(BinaryLossParams):
    """Soft Dice loss."""

    smooth: float = Smooth


class BCEDiceParams(BinaryLossParams):
    """Weighted sum of weighted BCE and soft Dice."""

    pos_weight: float | Literal["auto"] = PosWeight
    _check = field_validator("pos_weight")(classmethod(_positive_or_auto))
    smooth: float = Smooth
    bce_weight: float = Field(1.0, ge=0.0, description="weight of the BCE term")
    dice_weight: float = Field(1.0, ge=0.0, description="weight of the Dice term")


class FocalParams(BinaryLossParams):
    """Binary focal loss: down-weights easy pixels."""

    alpha: float = Field(
        0.25, ge=0.0, le=1.0, description="weight of foreground pixels (background: 1 - alpha)")
    gamma: float = Field(2.0, ge=0.0, description="focusing exponent; 0 gives alpha-weighted BCE")


class CrossEntropyParams(Params):
    """Softmax cross-entropy for the multiclass task."""

    tasks: ClassVar[tuple[str, ...]] = ("multiclass",)
    class_weights: list[float] = Field(
        [], description="one weight per class of the task (19 train classes), or [] for equal "
                        "weights")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="mass spread uniformly over classes")

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, weights: list[float]) -> list[float]:
        if weights and min(weights) < 0:
            raise ValueError(f"class_weights must be non-negative, got {min(weights)}")
        return weights

    def check_fits(self, ctx: BuildContext) -> None:
        if self.class_weights and len(self.class_weights) != ctx.out_channels:
            raise ValueError(f"loss.class_weights: {len(self.class_weights)} numbers given, but "
                             f"the {ctx.task} task has {ctx.out_channels} classes (one weight "
                             f"each, or [] for equal weights)")


def _pos_weight(p: WeightedBCEParams | BCEDiceParams) -> float:
    if p.pos_weight == "auto":
        raise ValueError("pos_weight auto must be resolved from the training data before building "
                         "the loss")
    return float(p.pos_weight)


@LOSSES.register("weighted_bce", params=WeightedBCEParams)
def weighted_bce(p: WeightedBCEParams, ctx: BuildContext) -> nn.Module:
    """Binary cross-entropy with a foreground weight."""
    return WeightedBCE(pos_weight=_pos_weight(p), ignore_index=ctx.ignore_index)


@LOSSES.register("dice", params=DiceParams)
def dice(p: DiceParams, ctx: BuildContext) -> nn.Module:
    """Soft Dice loss."""
    return SoftDice(smooth=p.smooth, ignore_index=ctx.ignore_index)


@LOSSES.register("bce_dice", params=BCEDiceParams)
def bce_dice(p: BCEDiceParams, ctx: BuildContext) -> nn.Module:
    """Weighted BCE plus soft Dice."""
    return BCEDice(bce=WeightedBCE(pos_weight=_pos_weight(p), ignore_index=ctx.ignore_index),
                   dice=SoftDice(smooth=p.smooth, ignore_index=ctx.ignore_index),
                   bce_weight=p.bce_weight, dice_weight=p.dice_weight)


@LOSSES.register("focal", params=FocalParams)
def focal(p: FocalParams, ctx: BuildContext) -> nn.Module:
    """Binary focal loss."""
    return BinaryFocal(alpha=p.alpha, gamma=p.gamma, ignore_index=ctx.ignore_index)


@LOSSES.register("cross_entropy", params=CrossEntropyParams)
def cross_entropy(p: CrossEntropyParams, ctx: BuildContext) -> nn.Module:
    """Cross-entropy over the train classes, ignoring void pixels."""
    try:
        p.check_fits(ctx)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    weight = torch.tensor(p.class_weights, dtype=torch.float32) if p.class_weights else None
    return CrossEntropy(weight=weight, label_smoothing=p.label_smoothing,
                        ignore_index=ctx.ignore_index)
