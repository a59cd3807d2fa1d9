"""Losses for binary segmentation: logits (B, 1, H, W), targets (B, H, W) in {0, 1, ignore}.

Each loss is averaged over the non-ignored pixels of the whole batch and computed in float32,
whatever the autocast precision of the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

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
        per_pixel = F.binary_cross_entropy_with_logits(x, t, pos_weight=self.pos_weight, reduction="none")
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

    def __init__(self, *, bce: WeightedBCE, dice: SoftDice, bce_weight: float, dice_weight: float) -> None:
        super().__init__()
        self.bce, self.dice = bce, dice
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce_weight * self.bce(logits, target) + self.dice_weight * self.dice(logits, target)


PosWeight = Field(1.0, gt=0.0, description="weight of foreground pixels relative to background "
                  "(about background/foreground pixel ratio to balance the classes)")
Smooth = Field(1.0, ge=0.0, description="added to numerator and denominator of Dice; keeps empty masks finite")


class WeightedBCEParams(Params):
    """Weighted binary cross-entropy: the original project's loss."""

    pos_weight: float = PosWeight


class DiceParams(Params):
    """Soft Dice loss."""

    smooth: float = Smooth


class BCEDiceParams(Params):
    """Weighted sum of weighted BCE and soft Dice."""

    pos_weight: float = PosWeight
    smooth: float = Smooth
    bce_weight: float = Field(1.0, ge=0.0, description="weight of the BCE term")
    dice_weight: float = Field(1.0, ge=0.0, description="weight of the Dice term")


@LOSSES.register("weighted_bce", params=WeightedBCEParams)
def weighted_bce(p: WeightedBCEParams, ctx: BuildContext) -> nn.Module:
    """Binary cross-entropy with a foreground weight."""
    return WeightedBCE(pos_weight=p.pos_weight, ignore_index=ctx.ignore_index)


@LOSSES.register("dice", params=DiceParams)
def dice(p: DiceParams, ctx: BuildContext) -> nn.Module:
    """Soft Dice loss."""
    return SoftDice(smooth=p.smooth, ignore_index=ctx.ignore_index)


@LOSSES.register("bce_dice", params=BCEDiceParams)
def bce_dice(p: BCEDiceParams, ctx: BuildContext) -> nn.Module:
    """Weighted BCE plus soft Dice."""
    return BCEDice(bce=WeightedBCE(pos_weight=p.pos_weight, ignore_index=ctx.ignore_index),
                   dice=SoftDice(smooth=p.smooth, ignore_index=ctx.ignore_index),
                   bce_weight=p.bce_weight, dice_weight=p.dice_weight)
