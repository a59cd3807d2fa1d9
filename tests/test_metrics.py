"""Metrics against hand counts and an independent numpy implementation; boundary scores (BF
score, Boundary IoU) also against hand-worked masks and the retired pixel-tolerance measure."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cityseg.config import TrainerConfig
from cityseg.metrics import (
    BoundaryScores,
    ConfusionMatrix,
    binary_predictions,
    binary_scores,
    confusion_record,
    disk_or,
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


# ------------------------------------------------------------------ boundary scores
# BF score and Boundary IoU against hand-worked masks, a plain numpy reference and the retired
# pixel-tolerance measure. Most masks are 30 x 40, whose diagonal is 50 pixels (3-4-5): a
# fraction f of the diagonal is 50 f pixels, e.g. 0.024 -> 1.2 px (a 4-neighbour, at 1, is
# within; a diagonal one, at 1.41, and a pixel two away are not) and 0.012 -> 0.6 px (only the
# same pixel).

PX_1_2, PX_0_6 = 0.024, 0.012  # fractions of the 50-px diagonal: 1.2 and 0.6 pixels


def scores(*pairs, tolerance, dilation, classes=2):
    """Scores of (pred, target) numpy pairs, each pair one batch of one image."""
    metric = BoundaryScores(classes, tolerance=tolerance, dilation=dilation, ignore_index=IGNORE)
    for pred, target in pairs:
        metric.update(torch.as_tensor(pred)[None], torch.as_tensor(target)[None])
    return metric.compute()


def square(left, shape=(30, 40)):
    """Class 1: a 10 x 10 square, rows 10..19 and columns left..left+9, in class 0."""
    mask = np.zeros(shape, dtype=np.int64)
    mask[10:20, left:left + 10] = 1
    return mask


def test_shifted_square_by_hand():
    target, pred = square(10), square(12)  # the prediction two columns right
    # BF, tolerance 1.2 px: an edge 1 px off is matched, 2 px off (or diagonal) is not.
    # Class 1 contour (the square's 36 perimeter pixels): of the prediction's, top and bottom
    # rows match in 9 of 10 columns (12..20), its left column in rows 11 and 18 only (next to
    # the true top and bottom rows), its right column nowhere: 9+9+2+0 = 20 of 36; the true
    # contour likewise 20 of 36: F1 = 20/36.
    # Class 0 contour (the 40 background pixels 4-adjacent to the square): of the prediction's,
    # 9 + 9 in the rows above and below, 2 in the column left of it, 0 right of it: 20 of 40;
    # the true one likewise: F1 = 1/2.  BF = (5/9 + 1/2) / 2 = 19/36.
    # Boundary IoU, band 1.2 px: class 1: the square's two outer rings, 100 - 36 = 64 pixels
    # each; the overlap (rows 10..19 x cols 12..19, 80 px) minus either inner 6 x 6 (together
    # rows 12..17 x cols 12..19, 48 px) = 32 shared; IoU = 32 / (64 + 64 - 32) = 1/3.
    # Class 0: the ring two pixels deep around the square without 3 pixels at each corner,
    # 196 - 100 - 12 = 84 each; per column of the overlap 10..21 they share 0, 2, 4 x 8, 2, 0
    # = 36; IoU = 36 / (84 + 84 - 36) = 3/11.  Mean = (1/3 + 3/11) / 2 = 10/33.
    found = scores((pred, target), tolerance=PX_1_2, dilation=PX_1_2)
    assert found["bf_score"] == pytest.approx(19 / 36)
    assert found["boundary_iou"] == pytest.approx(10 / 33)
    perfect = scores((target, target), tolerance=PX_1_2, dilation=PX_1_2)
    assert perfect == {"bf_score": 1.0, "boundary_iou": 1.0}


def line(col):
    """Class 1: a one-pixel-wide vertical line, rows 5..24 of column col, in class 0."""
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[5:25, col] = 1
    return mask


def test_thin_object_by_hand():
    target = line(20)
    # one column off: every contour pixel (the line's 20, the background's 42 around it) has a
    # counterpart at distance 1 <= 1.2: BF = 1
    assert scores((line(21), target), tolerance=PX_1_2, dilation=PX_0_6)["bf_score"] == 1.0
    # two columns off: the line's own contour has no match (F1 = 0); of the background
    # contours (columns 19 and 21 and the ends of the truth; 21 and 23 and the ends of the
    # prediction) column 21 matches both ways, 20 of 42: F1 = 10/21.  BF = (0 + 10/21) / 2.
    # Band 0.6 px = the contour itself: class 1 bands share nothing; class 0 bands share column
    # 21: 20 / (42 + 42 - 20) = 5/16.  Mean = (0 + 5/16) / 2.
    found = scores((line(22), target), tolerance=PX_1_2, dilation=PX_0_6)
    assert found["bf_score"] == pytest.approx(5 / 21)
    assert found["boundary_iou"] == pytest.approx(5 / 32)


def halves(left_class, right_class, edge=20):
    """Columns < edge of left_class, the rest of right_class."""
    mask = np.full((30, 40), right_class, dtype=np.int64)
    mask[:, :edge] = left_class
    return mask


def test_two_classes_meeting_each_side_is_its_own_contour():
    target = halves(0, 1)  # class 0 contour: column 19; class 1 contour: column 20
    pred = halves(0, 1, edge=21)  # contours at columns 20 and 21
    # at 0.6 px each class's contour is one column from its true one: F1 = 0 for both
    assert scores((pred, target), tolerance=PX_0_6, dilation=PX_1_2)["bf_score"] == 0.0
    # at 1.2 px all match; class 0's contour at column 20 is not matched by class 1's there
    found = scores((pred, target), tolerance=PX_1_2, dilation=PX_1_2)
    assert found["bf_score"] == 1.0
    # bands 1.2 px = two columns: class 0 {18, 19} vs {19, 20}, class 1 {20, 21} vs {21, 22}:
    # 30 / (60 + 60 - 30) = 1/3 each
    assert found["boundary_iou"] == pytest.approx(1 / 3)


def test_an_edge_in_the_right_place_between_the_wrong_classes_is_not_matched():
    target, pred = halves(0, 1), halves(0, 2)  # the right half predicted as class 2
    # class 0: F1 1 (band IoU 1); class 1 only in the truth and class 2 only in the prediction:
    # 0 each, over the three classes present: 1/3 (the old class-agnostic measure: 1.0)
    found = scores((pred, target), tolerance=PX_1_2, dilation=PX_1_2, classes=3)
    assert found == pytest.approx({"bf_score": 1 / 3, "boundary_iou": 1 / 3})
    assert pixel_edge_f1(torch.as_tensor(pred)[None], torch.as_tensor(target)[None], 2) == 1.0


def test_ignored_pixels_are_no_class_in_either():
    target, pred = square(10), square(12)
    target[:, 30:] = IGNORE  # void, away from the squares
    pred[:, 30:] = 2  # a class predicted only there is not present, and the edge of the void
    # is no contour: the scores of the shifted square above
    found = scores((pred, target), tolerance=PX_1_2, dilation=PX_1_2, classes=3)
    assert found == pytest.approx({"bf_score": 19 / 36, "boundary_iou": 10 / 33})
    void = np.full((30, 40), IGNORE)  # an image without a labelled pixel is not scored
    assert scores((pred, target), (pred, void), tolerance=PX_1_2,
                  dilation=PX_1_2, classes=3) == pytest.approx(found)


def test_bf_is_a_mean_over_images_and_boundary_iou_sums_over_the_dataset():
    target, pred = square(10), square(12)
    empty = np.zeros((30, 40), dtype=np.int64)
    # the square missed: class 1 only in the truth (0), class 0 with a true contour and no
    # predicted one (0): BF 0 for that image, whatever its number of contour pixels
    assert scores((empty, target), tolerance=PX_1_2, dilation=PX_1_2)["bf_score"] == 0.0
    found = scores((target, target), (empty, target), tolerance=PX_1_2, dilation=PX_1_2)
    assert found["bf_score"] == 0.5
    # bands: the perfect image's (64 and 84) shared, the missed one's union only: 64/128, 84/168
    assert found["boundary_iou"] == 0.5
    # the same batch as one (B = 2) tensor, and counts summed over shards (as all_reduce does)
    batch = BoundaryScores(2, tolerance=PX_1_2, dilation=PX_1_2, ignore_index=IGNORE)
    truths = torch.as_tensor(np.stack([target, target]))
    batch.update(torch.as_tensor(np.stack([target, empty])), truths)
    assert batch.compute() == found
    shards = [BoundaryScores(2, tolerance=PX_1_2, dilation=PX_1_2, ignore_index=IGNORE)
              for _ in range(2)]
    shards[0].update(torch.as_tensor(target)[None], torch.as_tensor(target)[None])
    shards[1].update(torch.as_tensor(pred)[None], torch.as_tensor(target)[None])
    whole = scores((target, target), (pred, target), tolerance=PX_1_2, dilation=PX_1_2)
    assert shards[0].compute() != whole
    shards[0].counts += shards[1].counts
    assert shards[0].compute() == pytest.approx(whole)


# ------------------------------------------------------------------ independent references


def plain_contour(labels, valid):
    """Valid pixels with a valid 4-neighbour of another label."""
    h, w = labels.shape
    ys, xs = np.mgrid[:h, :w]
    out = np.zeros((h, w), dtype=bool)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        ny, nx = ny.clip(0, h - 1), nx.clip(0, w - 1)
        out |= inside & valid & valid[ny, nx] & (labels != labels[ny, nx])
    return out


def plain_within(points, fraction):
    """Pixels within fraction x diagonal of any of the points, from every pairwise distance."""
    h, w = points.shape
    ys, xs = np.mgrid[:h, :w]
    py, px = np.nonzero(points)
    d2 = (ys[..., None] - py) ** 2 + (xs[..., None] - px) ** 2
    return (d2 <= (fraction * math.hypot(h, w)) ** 2).any(-1)


def plain_f1(pr_edge, gt_edge, tolerance):
    if not gt_edge.any() and not pr_edge.any():
        return 1.0
    precision = (pr_edge & plain_within(gt_edge, tolerance)).sum() / max(pr_edge.sum(), 1)
    recall = (gt_edge & plain_within(pr_edge, tolerance)).sum() / max(gt_edge.sum(), 1)
    total = precision + recall
    return 2 * precision * recall / total if total else 0.0


def reference(pred, target, *, tolerance, dilation, classes):
    """The definitions written plainly in numpy, one image and one class at a time."""
    per_image, both, union = [], np.zeros(classes), np.zeros(classes)
    for p, t in zip(pred, target, strict=True):
        valid = t != IGNORE
        f1s = []
        for c in range(classes):
            gt, pr = (t == c) & valid, (p == c) & valid
            gt_edge, pr_edge = plain_contour(t, valid) & gt, plain_contour(p, valid) & pr
            if gt.any() or pr.any():
                f1s.append(plain_f1(pr_edge, gt_edge, tolerance) if gt.any() and pr.any()
                           else 0.0)
            gt_band = gt & plain_within(gt_edge, dilation)
            pr_band = pr & plain_within(pr_edge, dilation)
            both[c] += (gt_band & pr_band).sum()
            union[c] += (gt_band | pr_band).sum()
        if f1s:
            per_image.append(np.mean(f1s))
    return np.mean(per_image), np.mean([i / u for i, u in zip(both, union, strict=True) if u])


def test_against_the_numpy_reference_on_random_scenes():
    rng = np.random.default_rng(0)
    for trial in range(4):
        target = np.zeros((2, 18 + trial, 23), dtype=np.int64)
        for image in target:
            for _ in range(5):  # rectangles of random classes, some one pixel thin
                y, x = rng.integers(0, 15, 2)
                image[y:y + rng.integers(1, 8), x:x + rng.integers(1, 9)] = rng.integers(0, 4)
        pred = np.roll(target, rng.integers(-2, 3), axis=2)
        pred[rng.random(pred.shape) < 0.05] = rng.integers(0, 4)
        target[rng.random(target.shape) < 0.08] = IGNORE
        tolerance, dilation = (0.03, 0.1) if trial % 2 else (0.07, 0.2)
        metric = BoundaryScores(4, tolerance=tolerance, dilation=dilation, ignore_index=IGNORE)
        metric.update(torch.as_tensor(pred), torch.as_tensor(target))
        bf, biou = reference(pred, target, tolerance=tolerance, dilation=dilation, classes=4)
        assert metric.compute() == pytest.approx({"bf_score": bf, "boundary_iou": biou})


@pytest.mark.parametrize("radius", [0.5, 1.0, 1.5, 2.3, 5.0, 7.7])
def test_disk_or_is_the_euclidean_disk(radius):
    rng = np.random.default_rng(1)
    bits = np.where(rng.random((2, 17, 29)) < 0.03, 1 << rng.integers(0, 19, (2, 17, 29)), 0)
    expected = np.zeros_like(bits)
    reach = math.floor(radius)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx <= radius * radius:  # 5.0 takes (3, 4): the rim is inside
                shifted = np.zeros_like(bits)
                shifted[:, max(dy, 0):17 + min(dy, 0), max(dx, 0):29 + min(dx, 0)] = \
                    bits[:, max(-dy, 0):17 - max(dy, 0), max(-dx, 0):29 - max(dx, 0)]
                expected |= shifted
    got = disk_or(torch.as_tensor(bits, dtype=torch.int32), radius)
    assert np.array_equal(got.numpy(), expected)


def pixel_edge_f1(pred, target, tolerance_px):
    """The retired val/boundary_f1 (reference): class-agnostic edges (3 x 3 neighbourhood with
    two labels), a square tolerance in pixels, counts pooled over the batch."""
    def pool(x, r):
        return F.max_pool2d(x[:, None].float(), 2 * r + 1, stride=1, padding=r)[:, 0]

    def edges(labels):
        return pool(labels.float(), 1) != -pool(-labels.float(), 1)

    near_void = pool(target == IGNORE, 1) > 0
    gt, pr = edges(target) & ~near_void, edges(pred) & ~near_void
    precision = (pr & (pool(gt, tolerance_px) > 0)).sum().item() / pr.sum().item()
    recall = (gt & (pool(pr, tolerance_px) > 0)).sum().item() / gt.sum().item()
    return 2 * precision * recall / (precision + recall)


def street(scale):
    """A synthetic street frame of 128 x 256 pixels, nearest-upscaled by `scale`, and a
    prediction with edges one pixel off, a pole 40 pixels off and a car in the sky."""
    target = torch.zeros(1, 128, 256, dtype=torch.long)  # sky
    target[:, 40:] = 1  # building
    target[:, 90:] = 2  # road
    target[:, 60:100, 30:80] = 3  # car
    target[:, 20:110, 150:153] = 4  # pole, 3 pixels wide
    pred = target.clone()
    pred[:, :41], pred[:, 41:91], pred[:, 91:] = 0, 1, 2  # horizon and kerb one pixel low
    pred[:, 61:101, 31:81] = 3  # the car one pixel off
    pred[:, 20:110, 190:193] = 4  # the pole missed
    pred[:, 10:30, 200:230] = 3  # a car in the sky
    target[:, 120:] = IGNORE  # the ego vehicle
    return tuple(x.repeat_interleave(scale, 1).repeat_interleave(scale, 2) for x in (pred, target))


def test_the_bf_score_does_not_depend_on_the_resolution_scored():
    tolerance = TrainerConfig().boundary_tolerance_diagonal  # the default, 0.75 %
    found = {}
    for scale in (1, 4):  # 128 x 256 and 512 x 1024
        pred, target = street(scale)
        metric = BoundaryScores(5, tolerance=tolerance, ignore_index=IGNORE)
        metric.update(pred, target)
        found[scale] = {**metric.compute(), "old": pixel_edge_f1(pred, target, 2)}
    assert abs(found[1]["bf_score"] - found[4]["bf_score"]) < 0.05
    assert abs(found[1]["boundary_iou"] - found[4]["boundary_iou"]) < 0.05
    assert 0.3 < found[1]["bf_score"] < 0.9  # neither trivially perfect nor zero
    # the old 2-pixel measure: the 1-pixel errors become 4 pixels
    assert found[1]["old"] - found[4]["old"] > 0.3
