"""Losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from cityseg.config import Experiment  # noqa: F401  (registers every loss)
from cityseg.errors import ConfigError
from cityseg.losses import BinaryFocal, CrossEntropy, SoftDice, WeightedBCE
from cityseg.registry import LOSSES, BuildContext

IGNORE = 255
CTX = BuildContext(task="binary", out_channels=1, ignore_index=IGNORE, image_size=(4, 4))


def batch(logits, target):
    """(1, 1, 1, N) logits and (1, 1, N) targets from flat lists."""
    return (torch.tensor(logits, dtype=torch.float32).view(1, 1, 1, -1),
            torch.tensor(target).view(1, 1, -1))


def test_weighted_bce_by_hand_with_pos_weight_and_ignored_pixel():
    logits, target = batch([0.0, 2.0, 5.0], [1, 0, IGNORE])
    loss = WeightedBCE(pos_weight=3.0, ignore_index=IGNORE)(logits, target)
    # foreground pixel: 3 * -log(sigmoid(0)) = 3 ln 2;
    # background: -log(1 - sigmoid(2)) = ln(1 + e^2)
    expected = (3 * math.log(2) + math.log(1 + math.e**2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_pos_weight_one_is_plain_bce():
    logits, target = batch([0.3, -1.2, 2.0, 0.0], [1, 0, 0, 1])
    loss = WeightedBCE(pos_weight=1.0, ignore_index=IGNORE)(logits, target)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits.flatten(),
                                                                 target.flatten().float())
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_soft_dice_by_hand():
    logits, target = batch([0.0, 0.0, 9.0], [1, 0, IGNORE])  # p = 0.5, 0.5; third pixel ignored
    # intersection 0.5, |P| = 1, |T| = 1
    assert (SoftDice(smooth=1.0, ignore_index=IGNORE)(logits, target).item()
            == pytest.approx(1 - 2 / 3))
    assert SoftDice(smooth=0.0, ignore_index=IGNORE)(logits, target).item() == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["weighted_bce", "dice", "bce_dice"])
def test_ignored_pixels_do_not_change_any_loss(name):
    loss_fn = LOSSES.build(LOSSES.get(name).params(name=name), CTX)
    a = loss_fn(*batch([0.5, -0.5, 100.0], [1, 0, IGNORE]))
    b = loss_fn(*batch([0.5, -0.5, -100.0], [1, 0, IGNORE]))
    assert a.item() == pytest.approx(b.item())


def test_bce_dice_is_the_weighted_sum():
    logits, target = batch([0.4, -1.0, 2.0], [1, 0, 1])
    params = LOSSES.get("bce_dice").params(name="bce_dice", pos_weight=2.0, bce_weight=0.3,
                                           dice_weight=0.7)
    combined = LOSSES.build(params, CTX)(logits, target)
    bce = WeightedBCE(pos_weight=2.0, ignore_index=IGNORE)(logits, target)
    dice = SoftDice(smooth=1.0, ignore_index=IGNORE)(logits, target)
    assert combined.item() == pytest.approx(0.3 * bce.item() + 0.7 * dice.item())


def test_focal_by_hand():
    logits, target = batch([0.0, 0.0, 3.0], [1, 0, IGNORE])
    loss = BinaryFocal(alpha=0.25, gamma=2.0, ignore_index=IGNORE)(logits, target)
    # p_t = 0.5 for both: 0.25 * 0.5^2 * ln 2 (foreground) and 0.75 * 0.5^2 * ln 2 (background)
    assert loss.item() == pytest.approx((0.0625 + 0.1875) / 2 * math.log(2), rel=1e-6)
    gamma0 = BinaryFocal(alpha=0.5, gamma=0.0, ignore_index=IGNORE)(logits, target)
    assert gamma0.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)  # alpha-weighted BCE


def test_cross_entropy_by_hand_with_weights_smoothing_and_ignore():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([0, 1, IGNORE]).view(1, 1, 3)
    first = math.log(1 + 2 * math.exp(-2))  # -log softmax([2, 0, 0])[0]
    plain = CrossEntropy(weight=None, label_smoothing=0.0, ignore_index=IGNORE)(logits, target)
    assert plain.item() == pytest.approx((first + math.log(3)) / 2, rel=1e-6)
    weighted = CrossEntropy(weight=torch.tensor([3.0, 1.0, 1.0]), label_smoothing=0.0,
                            ignore_index=IGNORE)(logits, target)
    assert weighted.item() == pytest.approx((3 * first + math.log(3)) / 4, rel=1e-6)
    eps = 0.3
    log_p = [-first, -(2 + first), -(2 + first)]  # log softmax([2, 0, 0])
    smoothed_first = (1 - eps) * first - eps / 3 * sum(log_p)
    smoothed = CrossEntropy(weight=None, label_smoothing=eps, ignore_index=IGNORE)(logits, target)
    assert smoothed.item() == pytest.approx((smoothed_first + math.log(3)) / 2, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_every_registered_loss_runs_forward_and_backward(name):
    params = LOSSES.get(name).params
    task = params.tasks[0]
    classes = 1 if task == "binary" else 19
    loss_fn = LOSSES.build(params(name=name), BuildContext(task, classes, IGNORE, (8, 8)))
    logits = torch.randn(2, classes, 8, 8, requires_grad=True)
    target = torch.randint(0, 2 if task == "binary" else 19, (2, 8, 8))
    target[0, 0] = IGNORE
    loss = loss_fn(logits, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    # ignored row: no gradient
    assert logits.grad is not None and logits.grad[0, :, 0].abs().sum() == 0


def test_pos_weight_auto_must_be_resolved_before_building():
    with pytest.raises(ValueError, match="resolved from the training data"):
        LOSSES.build(LOSSES.get("weighted_bce").params(name="weighted_bce", pos_weight="auto"), CTX)


def test_cross_entropy_class_weights_must_fit_the_tasks_classes():
    params = LOSSES.get("cross_entropy").params
    three = BuildContext(task="multiclass", out_channels=3, ignore_index=IGNORE, image_size=(4, 4))
    loss_fn = LOSSES.build(params(name="cross_entropy", class_weights=[3.0, 1.0, 1.0]), three)
    assert loss_fn.weight.tolist() == [3.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match=r"loss.class_weights: 19 numbers given, but the "
                                          r"multiclass task has 3 classes"):
        LOSSES.build(params(name="cross_entropy", class_weights=[1.0] * 19), three)
    with pytest.raises(ValueError, match="class_weights must be non-negative"):
        params(name="cross_entropy", class_weights=[1.0, -1.0, 1.0])
