"""Losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from cityseg.config import Experiment
from cityseg.losses import SoftDice, WeightedBCE
from cityseg.registry import LOSSES, BuildContext

IGNORE = 255
CTX = BuildContext(out_channels=1, ignore_index=IGNORE, image_size=(4, 4))


def batch(logits, target):
    """(1, 1, 1, N) logits and (1, 1, N) targets from flat lists."""
    return (torch.tensor(logits, dtype=torch.float32).view(1, 1, 1, -1),
            torch.tensor(target).view(1, 1, -1))


def test_weighted_bce_by_hand_with_pos_weight_and_ignored_pixel():
    logits, target = batch([0.0, 2.0, 5.0], [1, 0, IGNORE])
    loss = WeightedBCE(pos_weight=3.0, ignore_index=IGNORE)(logits, target)
    # foreground pixel: 3 * -log(sigmoid(0)) = 3 ln 2; background: -log(1 - sigmoid(2)) = ln(1 + e^2)
    expected = (3 * math.log(2) + math.log(1 + math.e**2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_pos_weight_one_is_plain_bce():
    logits, target = batch([0.3, -1.2, 2.0, 0.0], [1, 0, 0, 1])
    loss = WeightedBCE(pos_weight=1.0, ignore_index=IGNORE)(logits, target)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits.flatten(), target.flatten().float())
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_soft_dice_by_hand():
    logits, target = batch([0.0, 0.0, 9.0], [1, 0, IGNORE])  # p = 0.5, 0.5; third pixel ignored
    # intersection 0.5, |P| = 1, |T| = 1
    assert SoftDice(smooth=1.0, ignore_index=IGNORE)(logits, target).item() == pytest.approx(1 - 2 / 3)
    assert SoftDice(smooth=0.0, ignore_index=IGNORE)(logits, target).item() == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["weighted_bce", "dice", "bce_dice"])
def test_ignored_pixels_do_not_change_any_loss(name):
    loss_fn = LOSSES.build(LOSSES.get(name).params(name=name), CTX)
    a = loss_fn(*batch([0.5, -0.5, 100.0], [1, 0, IGNORE]))
    b = loss_fn(*batch([0.5, -0.5, -100.0], [1, 0, IGNORE]))
    assert a.item() == pytest.approx(b.item())


def test_bce_dice_is_the_weighted_sum():
    logits, target = batch([0.4, -1.0, 2.0], [1, 0, 1])
    params = LOSSES.get("bce_dice").params(name="bce_dice", pos_weight=2.0, bce_weight=0.3, dice_weight=0.7)
    combined = LOSSES.build(params, CTX)(logits, target)
    bce = WeightedBCE(pos_weight=2.0, ignore_index=IGNORE)(logits, target)
    dice = SoftDice(smooth=1.0, ignore_index=IGNORE)(logits, target)
    assert combined.item() == pytest.approx(0.3 * bce.item() + 0.7 * dice.item())


@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_every_registered_loss_runs_forward_and_backward(name):
    assert Experiment  # the experiment module imported every loss
    loss_fn = LOSSES.build(LOSSES.get(name).params(name=name), CTX)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8))
    target[0, 0] = IGNORE
    loss = loss_fn(logits, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logits.grad is not None and logits.grad[0, 0, 0].abs().sum() == 0  # ignored row: no gradient
