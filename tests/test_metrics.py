"""Metrics against hand counts and an independent numpy implementation (boundary scores:
test_boundary.py)."""

import numpy as np
import pytest
import torch

from cityseg.metrics import (
    ConfusionMatrix,
    binary_predictions,
    binary_scores,
    confusion_record,
    multiclass_scores,
)

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
    # sigmoid(0) = 0.5 is not > 0.5
    assert binary_predictions(logits, 0.5).flatten().tolist() == [0, 0, 1]
    assert binary_predictions(logits, 0.2).flatten().tolist() == [1, 1, 1]


NAMES = ("a", "b", "c", "d")


def test_multiclass_hand_counted_and_absent_class_excluded():
    cm = ConfusionMatrix(4, ignore_index=IGNORE)
    target = torch.tensor([[0, 0, 1, 1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 3]])  # class 3 predicted only on an ignored pixel
    cm.update(pred, target)
    s = multiclass_scores(cm.counts, NAMES)
    # a: tp 1, fp 1, fn 1 -> 1/3;  b: tp 2, fp 1 -> 2/3;  c: tp 0, fn 1 -> 0;  d: absent
    assert (s["iou/a"] == pytest.approx(1 / 3) and s["iou/b"] == pytest.approx(2 / 3)
            and s["iou/c"] == 0.0)
    assert "iou/d" not in s
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)


def test_multiclass_against_numpy_reference():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, (3, 12, 12))
    target[rng.random(target.shape) < 0.1] = IGNORE
    pred = np.where(rng.random(target.shape) < 0.6, np.where(target == IGNORE, 0, target),
                    rng.integers(0, 4, target.shape))
    cm = ConfusionMatrix(4, ignore_index=IGNORE)
    for i in range(3):
        cm.update(torch.tensor(pred[i:i + 1]), torch.tensor(target[i:i + 1]))
    s = multiclass_scores(cm.counts, NAMES)
    valid = target != IGNORE
    ious = []
    for c in range(4):
        tp = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        ious.append(tp / union)
        assert s[f"iou/{NAMES[c]}"] == pytest.approx(ious[-1])
    assert s["miou"] == pytest.approx(np.mean(ious))
    assert s["pixel_accuracy"] == pytest.approx(np.mean(pred[valid] == target[valid]))


def test_multiclass_perfect_is_one():
    cm = ConfusionMatrix(3, ignore_index=IGNORE)
    labels = torch.tensor([[0, 1, 2, 2]])
    cm.update(labels, labels)
    s = multiclass_scores(cm.counts, NAMES[:3])
    assert s["miou"] == 1.0 and s["pixel_accuracy"] == 1.0


def test_confusion_record_is_the_one_schema_of_confusion_matrix_json():
    counts = torch.tensor([[5, 1], [2, 7]])
    record = confusion_record(counts, ("background", "foreground"))
    assert record == {"rows": "ground truth", "columns": "prediction",
                      "classes": ["background", "foreground"], "counts": [[5, 1], [2, 7]]}
    assert confusion_record(counts.numpy(), ("background", "foreground")) == record
    with pytest.raises(ValueError, match="3 classes is 3 x 3, got"):
        confusion_record(counts, ("a", "b", "c"))
