"""Evaluate and calibrate a trained model: the metrics training logged, at full resolution
exactly what predict writes, a linked evaluation run, and overrides of how it infers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image

from cityseg import checkpoints
from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.data.cityscapes import id_to_train_id_lut
from cityseg.data.datasets import data_index, task_lut
from cityseg.data.layouts import read_sample
from cityseg.infer import evaluation, loading
from cityseg.metrics import confusion_record
from cityseg.tracking import tracking_uri
from cityseg.train import runner
from tests.conftest import CITYSCAPES_MINI, QUICKSTART, tiny_overrides


def test_evaluate_reproduces_the_validation_metrics_training_logged(trained_run):
    tmp_path, result = trained_run
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    trained = loading.load_trained(run_id=None, checkpoint=result.checkpoints["last"],
                                     runs=tmp_path / "runs")
    found, _ = evaluation.evaluate(trained, split="val", full_resolution=False)
    for key in ("dice", "iou", "precision", "recall", "bf_score", "boundary_iou"):
        history = client.get_metric_history(result.run_id, f"val/{key}")
        (logged,) = [m.value for m in history if m.step == 2]
        assert found[key] == pytest.approx(logged, abs=1e-9), key


def _by_hand(model, photo, size, threshold):
    """Independent reference of full-resolution prediction: PIL bilinear resize to the training
    size, ImageNet normalisation written out, an fp32 forward, bilinear logit upsampling."""
    height, width = size
    small = np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR), np.float32)
    x = (small / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = F.interpolate(model.float()(x), size=photo.shape[:2], mode="bilinear",
                               align_corners=False)
    return (torch.sigmoid(logits[0, 0]) > threshold).numpy().astype(np.uint8)


def _binary_counts(pred, target):
    valid = target != 255
    return (int(np.sum((pred == 1) & (target == 1) & valid)),
            int(np.sum((pred == 1) & (target == 0) & valid)),
            int(np.sum((pred == 0) & (target == 1) & valid)))


def test_full_resolution_scores_the_upsampled_logits_against_full_labels(trained_run):
    tmp_path, result = trained_run
    trained = loading.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=tmp_path / "runs", overrides=["trainer.precision=fp32"])
    found, counts = evaluation.evaluate(trained, split="val", full_resolution=True)
    index = data_index(trained.exp.data, ("val",))
    lut = task_lut(trained.exp.data)
    tp = fp = fn = labelled = 0
    for sample in index.samples["val"]:
        photo, train_ids = read_sample(sample, layout=index.layout, encoding=index.encoding)
        target = lut[train_ids]
        pred = _by_hand(trained.predictor.model, photo, (32, 64), trained.threshold)
        t, f, n = _binary_counts(pred, target)
        tp, fp, fn, labelled = tp + t, fp + f, fn + n, labelled + int((target != 255).sum())
    assert counts.sum() == labelled  # every full-size labelled pixel counted
    assert (counts[1, 1], counts[0, 1], counts[1, 0]) == (tp, fp, fn)
    assert found["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)


@pytest.mark.skipif(not CITYSCAPES_MINI.is_dir(), reason="../shared/data/cityscapes-mini absent")
def test_evaluate_full_resolution_scores_exactly_what_predict_writes_on_real_frames(
        trained_run, tmp_path):
    source_dir, result = trained_run
    runs = source_dir / "runs"
    photos = sorted((CITYSCAPES_MINI / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    # a threshold at which the barely trained model finds some foreground and misses some: the
    # mean foreground probability over the foreground pixels of the first frame
    lut = task_lut(load_experiment(QUICKSTART).data)  # the quickstart's foreground classes

    def target_of(photo):
        stem = photo.name.removesuffix("_leftImg8bit.png")
        label_file = next(CITYSCAPES_MINI.rglob(f"{stem}_gtFine_labelIds.png"))
        label_ids = np.asarray(Image.open(label_file))
        return lut[id_to_train_id_lut()[label_ids]]

    trained = loading.load_trained(run_id=None, checkpoint=result.checkpoints["best"], runs=runs)
    _, prob = trained.predictor.predict_photo(np.asarray(Image.open(photos[0]).convert("RGB")))
    checkpoint = tmp_path / "model.pt"
    threshold = float(prob[target_of(photos[0]) == 1].mean())
    checkpoints.save_atomic({**trained.checkpoint, "threshold": threshold}, checkpoint)
    out = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, photos),
                 "--out", str(out)]) == 0
    # the written masks, scored by hand against the official labelIds
    tp = fp = fn = 0
    for photo in photos:
        target = target_of(photo)
        mask = np.asarray(Image.open(out / f"{photo.stem}_mask.png"))
        assert mask.shape == target.shape == (1024, 2048)
        t, f, n = _binary_counts(mask // 255, target)
        tp, fp, fn = tp + t, fp + f, fn + n
    assert tp > 0 and fp > 0 and fn > 0  # not a degenerate all-background prediction
    trained = loading.load_trained(run_id=None, checkpoint=checkpoint, runs=runs,
                                     overrides=[f"data.root={CITYSCAPES_MINI}"])
    found, counts = evaluation.evaluate(trained, split="val", full_resolution=True)
    assert (counts[1, 1], counts[0, 1], counts[1, 0]) == (tp, fp, fn)
    assert found["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert found["recall"] == pytest.approx(tp / (tp + fn))
    assert found["iou"] == pytest.approx(tp / (tp + fp + fn))


def test_calibration_never_lowers_dice_and_the_threshold_reaches_predict(trained_run, tmp_path):
    source_dir, result = trained_run
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(result.checkpoints["best"].read_bytes())
    trained = loading.load_trained(run_id=None, checkpoint=checkpoint, runs=source_dir / "runs")
    calibration = evaluation.calibrate(trained, split="val")
    assert calibration.thresholds[calibration.at_half] == pytest.approx(0.5)
    assert calibration.dice[calibration.best] >= calibration.dice[calibration.at_half]
    found, _ = evaluation.evaluate(trained, split="val", full_resolution=False)
    assert calibration.dice[calibration.at_half] == pytest.approx(found["dice"], abs=1e-3)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--calibrate", "--write-threshold",
                 "--runs", str(source_dir / "runs")]) == 0
    again = loading.load_trained(run_id=None, checkpoint=checkpoint, runs=source_dir / "runs")
    assert again.threshold == pytest.approx(calibration.thresholds[calibration.best])


def test_evaluate_logs_a_linked_run(trained_run, capsys, tmp_path):
    source_dir, result = trained_run
    # the 8 characters tables print name the run as its whole id does
    assert main(["evaluate", "--run", result.run_id[:8], "--runs", str(source_dir / "runs")]) == 0
    client = MlflowClient(tracking_uri=tracking_uri(source_dir / "runs"))
    experiment = client.get_experiment_by_name("quickstart")
    linked = client.search_runs([experiment.experiment_id], f"tags.source_run = '{result.run_id}'")
    best = str(result.checkpoints["best"])
    (evaluation,) = [r for r in linked if r.data.tags["checkpoint"] == best]
    assert evaluation.info.status == "FINISHED" and "val/dice" in evaluation.data.metrics
    samples = client.list_artifacts(evaluation.info.run_id, "samples")
    assert "samples/val.png" in {a.path for a in samples}
    confusion = client.download_artifacts(evaluation.info.run_id, "confusion_matrix.json",
                                          str(tmp_path))
    record = json.loads(Path(confusion).read_text())
    assert record == confusion_record(torch.tensor(record["counts"]), ("background", "foreground"))


def test_crop_training_at_a_kept_scale_with_slide_validation_and_evaluate_overrides(tmp_path):
    overrides = [*tiny_overrides(tmp_path, epochs=1), "tracking.log_model=false",
                 "data.scale=[64,128]",
                 "augment=[{name: random_scale, ratio: [0.5, 1.5]}, {name: random_crop}, "
                 "{name: hflip}]",
                 "trainer.inference.mode=slide", "trainer.inference.overlap=0.5"]
    exp = load_experiment(QUICKSTART, overrides)
    result = runner.run(exp)
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    run = client.get_run(result.run_id)
    assert run.data.tags["inference"] == "slide (overlap 0.5)"
    assert "val/dice" in run.data.metrics
    # validation saw 64x128 frames: the decode cache holds them at that size
    trained = loading.load_trained(run_id=result.run_id, checkpoint=None, runs=tmp_path / "runs")
    images, _ = next(iter(evaluation.split_loader(trained, "val")))
    assert tuple(images.shape[-2:]) == (64, 128)
    assert main(["evaluate", "--run", result.run_id, "--runs", str(tmp_path / "runs"),
                 "--inference", "whole", "--tta", "flip"]) == 0
    evals = [r for r in client.search_runs([run.info.experiment_id])
             if r.data.tags.get("source_run") == result.run_id]
    assert [r.data.tags["inference"] for r in evals] == ["whole + flip"]
