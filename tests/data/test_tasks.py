"""The task table: each entry against hand-worked labels, scores and lookup tables."""

import numpy as np
import pytest
import torch

from cityseg.data.cityscapes import IGNORE_INDEX, LABEL_BY_NAME, TRAIN_CLASSES
from cityseg.data.tasks import TASKS

BINARY, MULTICLASS = TASKS["binary"], TASKS["multiclass"]


def test_binary_maps_the_foreground_train_ids_to_one_and_keeps_void_ignored():
    lut = BINARY.lut(["car", "person"])
    assert lut[LABEL_BY_NAME["car"].train_id] == 1 and lut[LABEL_BY_NAME["person"].train_id] == 1
    assert lut[LABEL_BY_NAME["road"].train_id] == 0 and lut[LABEL_BY_NAME["bus"].train_id] == 0
    assert lut[IGNORE_INDEX] == IGNORE_INDEX and lut[len(TRAIN_CLASSES)] == IGNORE_INDEX


def test_multiclass_keeps_the_19_train_ids():
    lut = MULTICLASS.lut(["car"])  # foreground does not matter here
    assert lut[:19].tolist() == list(range(19)) and set(lut[19:].tolist()) == {IGNORE_INDEX}
    assert MULTICLASS.out_channels == MULTICLASS.num_classes == 19


def test_labels_threshold_the_sigmoid_or_take_the_argmax():
    logits = torch.tensor([-1.0, 0.0, 0.1]).view(1, 1, 1, 3)
    # sigmoid(0) = 0.5 is not above 0.5; sigmoid(0.1) = 0.525
    assert BINARY.labels(logits, threshold=0.5).flatten().tolist() == [0, 0, 1]
    assert BINARY.labels(logits, threshold=0.52).flatten().tolist() == [0, 0, 1]
    assert BINARY.labels(logits, threshold=0.53).flatten().tolist() == [0, 0, 0]
    scores = torch.zeros(1, 19, 1, 2)
    scores[0, 7, 0, 0], scores[0, 18, 0, 1] = 3.0, 1.0
    assert MULTICLASS.labels(scores, threshold=0.5).flatten().tolist() == [7, 18]
    with pytest.raises(ValueError, match="no single foreground probability"):
        MULTICLASS.probabilities(scores)


def test_scores_and_monitors_of_each_task():
    counts = torch.tensor([[5, 1], [2, 3]])  # tn fp / fn tp
    found = BINARY.scores(counts)
    assert found["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert found["iou"] == pytest.approx(3 / 6) and found["precision"] == pytest.approx(3 / 4)
    assert BINARY.monitors[0] == "val/dice" and MULTICLASS.monitors[0] == "val/miou"
    for task in TASKS.values():
        assert {"val/bf_score", "val/boundary_iou", "val/loss", "train/loss"} <= set(task.monitors)
        assert all(f"val/{name}" in task.monitors for name in task.score_names)
    diagonal = torch.diag(torch.arange(1, 20))
    assert MULTICLASS.scores(diagonal)["miou"] == pytest.approx(1.0)


def test_drawing_and_writing_labels():
    labels = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    assert BINARY.mask_values[labels].tolist() == [[0, 255], [255, 0]]
    assert BINARY.colors[1].tolist() == [255, 255, 255] and BINARY.colors[0].tolist() == [0, 0, 0]
    assert BINARY.overlay_alpha[0] == 0.0 and BINARY.overlay_alpha[1] > 0
    assert MULTICLASS.mask_values[labels].tolist() == labels.tolist()  # train ids as they are
    assert MULTICLASS.colors[LABEL_BY_NAME["road"].train_id].tolist() == [128, 64, 128]
