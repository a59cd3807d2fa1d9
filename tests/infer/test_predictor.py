"""The one inference path: inputs, labels, full-size photos and dataset-level scores."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cityseg.config import TrainerConfig
from cityseg.data.cityscapes import LABEL_BY_NAME
from cityseg.data.tasks import HEADLINE_METRICS, TASKS
from cityseg.infer.predictor import Predictor, place_model
from cityseg.models.encoders import IMAGENET_MEAN as MEAN
from cityseg.models.encoders import IMAGENET_STD as STD


class ChannelMean(nn.Module):
    """A fixed 'model' whose single logit is the mean of the input channels, times a gain."""

    def __init__(self, out_channels: int = 1, gain: float = 4.0) -> None:
        super().__init__()
        self.out_channels, self.gain = out_channels, gain

    def forward(self, x):
        return (x.mean(1, keepdim=True) * self.gain).repeat(1, self.out_channels, 1, 1)


def predictor(task="binary", *, channels_last=False, size=(8, 16), model=None, threshold=0.5):
    task = TASKS[task] if isinstance(task, str) else task
    return Predictor(model=model or ChannelMean(task.out_channels), device=torch.device("cpu"),
                     amp_dtype=None, channels_last=channels_last, task=task, threshold=threshold,
                     image_size=size)


def test_inputs_are_normalised_on_the_device_in_the_asked_layout():
    images = torch.randint(0, 256, (2, 3, 8, 16), dtype=torch.uint8)
    x = predictor(channels_last=True).inputs(images)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32


def test_predict_photo_resizes_like_the_data_and_upsamples_the_logits():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    labels, prob = predictor().predict_photo(photo)
    # by hand: PIL bilinear to (8, 16), normalise, the model, bilinear back, sigmoid > 0.5
    small = np.asarray(Image.fromarray(photo).resize((16, 8), Image.BILINEAR), np.float32) / 255
    x = torch.from_numpy((small - np.array(MEAN)) / np.array(STD)).float().permute(2, 0, 1)[None]
    logits = F.interpolate(ChannelMean()(x), size=(37, 53), mode="bilinear", align_corners=False)
    assert np.allclose(prob, torch.sigmoid(logits[0, 0]).numpy(), atol=1e-6)
    assert labels.shape == (37, 53) and (labels == (prob > 0.5)).all()
    assert 0 < labels.mean() < 1


def test_evaluate_photos_scores_what_predict_photo_predicts():
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8) for i in range(3)]
    targets = [rng.integers(0, 2, p.shape[:2]).astype(np.uint8) for p in photos]
    targets[0][:2] = 255  # ignored
    p = predictor()
    found, counts = p.evaluate_photos(zip(photos, targets, strict=True), tolerance=1)
    tp = fp = fn = 0
    for photo, target in zip(photos, targets, strict=True):
        labels, _ = p.predict_photo(photo)
        valid = target != 255
        tp += np.sum((labels == 1) & (target == 1) & valid)
        fp += np.sum((labels == 1) & (target == 0) & valid)
        fn += np.sum((labels == 0) & (target == 1) & valid)
    assert (counts[1, 1], counts[0, 1], counts[1, 0]) == (tp, fp, fn)
    assert found["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_evaluate_is_dataset_level_and_reports_the_mean_loss():
    rng = np.random.default_rng(2)
    batches = [(torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 16), dtype=np.uint8)),
                torch.from_numpy(rng.integers(0, 2, (n, 8, 16)).astype(np.uint8))) for n in (3, 1)]
    p = predictor()
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(logits, y):
        return loss_fn(logits[:, 0], y.float())

    found, counts = p.evaluate(batches, tolerance=1, loss_fn=loss)
    labels = [p.predict(images) for images, _ in batches]
    targets = torch.cat([m for _, m in batches]).long()
    pred = torch.cat(labels)
    assert counts[1, 1] == ((pred == 1) & (targets == 1)).sum()
    assert counts.sum() == targets.numel()
    by_batch = [loss(p.logits(p.inputs(i)), m.long()).item() * len(i) for i, m in batches]
    assert found["loss"] == pytest.approx(sum(by_batch) / 4, rel=1e-6)


def test_a_new_task_is_one_entry_of_the_table():
    """Drivable area (road vs the rest) written as one Task: labels, scores and writing follow."""
    drivable = dataclasses.replace(
        TASKS["binary"], name="drivable", description="road vs the rest",
        label_lut=lambda foreground: TASKS["binary"].lut(["road"]))
    road = LABEL_BY_NAME["road"].train_id
    lut = drivable.lut([])
    assert lut[road] == 1 and lut[LABEL_BY_NAME["car"].train_id] == 0
    p = predictor(drivable)
    train_ids = np.full((8, 16), LABEL_BY_NAME["building"].train_id, dtype=np.uint8)
    train_ids[4:] = road
    image = np.zeros((8, 16, 3), dtype=np.uint8)
    image[4:] = 255  # bright road, dark buildings: the channel-mean model finds the road
    found, counts = p.evaluate_photos([(image, lut[train_ids])], tolerance=0)
    assert counts.tolist() == [[64, 0], [0, 64]] and found["iou"] == 1.0
    assert drivable.mask_values[p.predict_photo(image)[0]].max() == 255


def _modes(model, *, size, mode, overlap=1 / 3, tta="none"):
    from cityseg.config import InferenceConfig

    return Predictor(model=model, device=torch.device("cpu"), amp_dtype=None,
                     channels_last=False, task=TASKS["multiclass"], threshold=0.5,
                     image_size=size, inference=InferenceConfig(mode=mode, overlap=overlap,
                                                                tta=tta))


@pytest.mark.parametrize("frame", [(32, 64), (50, 90), (20, 40), (64, 200)],
                         ids=["window", "larger", "smaller", "wide"])
@pytest.mark.parametrize("overlap", [0.0, 1 / 3, 0.5])
def test_slide_equals_whole_for_a_pointwise_model_at_any_size(frame, overlap):
    torch.manual_seed(0)
    pointwise = nn.Conv2d(3, 5, kernel_size=1)
    x = torch.randn(2, 3, *frame)
    whole = _modes(pointwise, size=(32, 64), mode="whole").frame_logits(x)
    slide = _modes(pointwise, size=(32, 64), mode="slide", overlap=overlap).frame_logits(x)
    assert slide.shape == whole.shape == (2, 5, *frame)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


def test_slide_on_a_frame_of_the_window_size_is_whole_inference_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2))
    x = torch.randn(1, 3, 32, 64)
    assert torch.equal(_modes(model, size=(32, 64), mode="slide").frame_logits(x),
                       _modes(model, size=(32, 64), mode="whole").frame_logits(x))


def test_slide_without_overlap_stitches_the_windows_of_a_spatial_model():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 5, padding=2)  # sees its neighbours: windows differ from whole
    x = torch.randn(1, 3, 32, 128)
    slide = _modes(model, size=(32, 64), mode="slide", overlap=0.0).frame_logits(x)
    with torch.no_grad():
        expected = torch.cat([model(x[..., :64]), model(x[..., 64:])], dim=-1)
    torch.testing.assert_close(slide, expected)
    whole = _modes(model, size=(32, 64), mode="whole").frame_logits(x)
    assert not torch.allclose(slide, whole)  # the seam: padding inside the frame


def test_slide_windows_lie_on_the_frame_and_pad_only_a_frame_smaller_than_one():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 5, padding=2)
    x = torch.randn(1, 3, 64, 64)  # twice the window's height, its width
    slide = _modes(model, size=(32, 64), mode="slide", overlap=1 / 3).frame_logits(x)
    total, count = torch.zeros(1, 2, 64, 64), torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        for top in (0, 21, 32):  # stride round(32 * 2/3) = 21; the last window flush with the end
            total[..., top : top + 32, :] += model(x[..., top : top + 32, :])
            count[..., top : top + 32, :] += 1
    torch.testing.assert_close(slide, total / count)


def test_flip_tta_of_a_mirror_symmetric_model_changes_nothing():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 3, padding=1, bias=True)
    with torch.no_grad():  # left-right symmetric kernels: the model commutes with mirroring
        model.weight.copy_((model.weight + model.weight.flip(-1)) / 2)
    x = torch.randn(2, 3, 32, 64)
    plain = _modes(model, size=(32, 64), mode="whole").frame_logits(x)
    flipped = _modes(model, size=(32, 64), mode="whole", tta="flip").frame_logits(x)
    torch.testing.assert_close(flipped, plain.float(), rtol=0, atol=1e-6)
    lopsided = nn.Conv2d(3, 2, 3, padding=1)
    assert not torch.allclose(_modes(lopsided, size=(32, 64), mode="whole",
                                     tta="flip").frame_logits(x),
                              _modes(lopsided, size=(32, 64), mode="whole").frame_logits(x))


@pytest.mark.parametrize("channels_last", [True, False])
def test_place_model_is_the_explicit_step_before_for_experiment(tmp_path, channels_last):
    from cityseg.config import load_experiment
    from tests.conftest import QUICKSTART, tiny_overrides

    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path), "trainer.device=cpu",
                                       f"trainer.channels_last={str(channels_last).lower()}"])
    model = nn.Conv2d(3, 1, 3, padding=1)
    placed = place_model(model, exp, "cpu")
    assert placed.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    p = Predictor.for_experiment(exp, placed)
    assert p.model is placed and p.device == torch.device("cpu")
    assert p.threshold == exp.trainer.threshold and p.image_size == tuple(exp.data.image_size)
    elsewhere = nn.Conv2d(3, 1, 3, padding=1, device="meta")
    with pytest.raises(ValueError, match=r"the model is on meta, the predictor on cpu: "
                                         r"place_model\(model, exp, device\) first"):
        Predictor.for_experiment(exp, elsewhere, device="cpu")


# ------------------------------------------------------------------ boundary scores


class Bright(nn.Module):
    """A 'model' whose foreground logit is the input's mean channel: white pixels are
    foreground, black ones background."""

    def forward(self, x):
        return x.mean(1, keepdim=True)


def test_the_predictor_reports_both_scores():
    p = Predictor(model=Bright(), device=torch.device("cpu"), amp_dtype=None,
                  channels_last=False, task=TASKS["binary"], threshold=0.5, image_size=(8, 16))
    masks = torch.zeros(4, 8, 16, dtype=torch.uint8)
    masks[:, 2:6, 4:10] = 1  # a 4 x 6 rectangle
    images = (masks * 255)[:, None].repeat(1, 3, 1, 1)
    truth = masks.clone()
    truth[3] = 0  # the last image holds no foreground
    # three perfect images (BF 1) and one whose every contour is wrong (BF 0): 3/4.
    # The band (2 % of an 18-px diagonal, under a pixel) is the contour: 16 rectangle and 20
    # background pixels, three times shared, once only predicted: 48/64 and 60/80.
    found, _ = p.evaluate([(images[:3], truth[:3]), (images[3:], truth[3:])],
                          tolerance=TrainerConfig().boundary_tolerance_diagonal)
    assert found["bf_score"] == pytest.approx(3 / 4)
    assert found["boundary_iou"] == pytest.approx(3 / 4)
    for task in TASKS.values():
        assert {"val/bf_score", "val/boundary_iou"} <= set(task.monitors)
    assert "val/bf_score" in HEADLINE_METRICS
