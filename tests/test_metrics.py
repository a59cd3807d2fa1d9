"""Metrics against hand counts and an independent numpy implementation."""

import numpy as np
import pytest
import torch

from cityseg.metrics import ConfusionMatrix, binary_predictions, binary_scores

IGNORE = 255


def scores_of(*batches):
    cm = ConfusionMatrix(2, ignore_index=IGNORE)
    for pred, target in batches:
        cm.update(torch.tensor(pred), torch.tensor(target))
    return cm.counts, binary_scores(cm.counts)


def test_hand_counted_confusion():
    #             tp  fn  fp  tn  ignored
    target = [[1, 1, 0, 0, IGNORE]]
    pred = [[1, 0, 1, 0, 1]]
    counts, s = scores_of((pred, target))
    assert counts.tolist() == [[1, 1], [1, 1]]  # [[tn, fp], [fn, tp]]
    assert s["dice"] == pytest.approx(2 / 4)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["precision"] == pytest.approx(1 / 2)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["accuracy"] == pytest.approx(2 / 4)


def test_scores_are_dataset_level_not_a_mean_of_batches():
    perfect = ([[1, 0]], [[1, 0]])  # batch dice 1
    missed = ([[0, 0, 0]], [[1, 1, 1]])  # batch dice 0
    _, s = scores_of(perfect, missed)
    assert s["dice"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 3))  # 0.4, not the batch mean 0.5


def test_against_numpy_reference():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, (4, 16, 16))
    target[rng.random(target.shape) < 0.1] = IGNORE
    pred = rng.integers(0, 2, (4, 16, 16))
    _, s = scores_of((pred[:2], target[:2]), (pred[2:], target[2:]))
    valid = target != IGNORE
    tp = np.sum((pred == 1) & (target == 1) & valid)
    fp = np.sum((pred == 1) & (target == 0) & valid)
    fn = np.sum((pred == 0) & (target == 1) & valid)
    assert s["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert s["precision"] == pytest.approx(tp / (tp + fp))
    assert s["recall"] == pytest.approx(tp / (tp + fn))
    assert s["accuracy"] == pytest.approx(np.mean(pred[valid] == target[valid]))


def test_perfect_prediction_scores_one():
    _, s = scores_of(([[1, 0, 1]], [[1, 0, 1]]))
    assert all(v == 1.0 for v in s.values())


def test_no_foreground_anywhere_is_perfect_not_nan():
    _, s = scores_of(([[0, 0]], [[0, 0]]))
    assert s == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}


def test_empty_prediction_of_present_foreground_scores_zero_not_nan():
    _, s = scores_of(([[0, 0]], [[1, 0]]))
    assert s["dice"] == 0.0 and s["iou"] == 0.0 and s["precision"] == 0.0 and s["recall"] == 0.0


def test_binary_predictions_threshold():
    logits = torch.tensor([-1.0, 0.0, 0.5]).view(1, 1, 1, 3)
    assert binary_predictions(logits, 0.5).flatten().tolist() == [0, 0, 1]  # sigmoid(0) = 0.5 is not > 0.5
    assert binary_predictions(logits, 0.2).flatten().tolist() == [1, 1, 1]
