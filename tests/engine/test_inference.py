"""Evaluate, predict and calibrate a trained model."""

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.data.datasets import data_index, task_lut
from cityseg.data.layouts import read_sample
from cityseg.engine import inference, runner
from cityseg.errors import CitysegError
from cityseg.tracking import tracking_uri
from tests.conftest import QUICKSTART, tiny_overrides


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny binary training run shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("trained")
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2), "tracking.log_model=false",
                                       "loss.pos_weight=4"])
    result = runner.run(exp)
    return tmp_path, result


def test_evaluate_reproduces_the_validation_metrics_training_logged(trained_run):
    tmp_path, result = trained_run
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    trained = inference.load_trained(run_id=None, checkpoint=result.checkpoints["last"], runs=tmp_path / "runs")
    found, _ = inference.evaluate(trained, split="val", full_resolution=False)
    for key in ("dice", "iou", "precision", "recall", "boundary_f1"):
        (logged,) = [m.value for m in client.get_metric_history(result.run_id, f"val/{key}") if m.step == 2]
        assert found[key] == pytest.approx(logged, abs=1e-9), key


def test_full_resolution_scores_the_upsampled_prediction_against_full_labels(trained_run):
    tmp_path, result = trained_run
    trained = inference.load_trained(run_id=result.run_id, checkpoint=None, runs=tmp_path / "runs")
    found, counts = inference.evaluate(trained, split="val", full_resolution=True)
    # independent reference: PIL nearest upsampling of the training-size prediction, numpy counts
    index = data_index(trained.exp.data, ("val",))
    lut = task_lut(trained.exp.data)
    tp = fp = fn = 0
    for sample in index.samples["val"]:
        photo, train_ids = read_sample(sample, layout=index.layout, encoding=index.encoding)
        small = np.array(Image.fromarray(photo).resize((64, 32), Image.BILINEAR))
        x = torch.from_numpy(small).permute(2, 0, 1)[None]
        xin, _ = inference.model_inputs(x, torch.zeros(1, 1, 1), device=trained.device, channels_last=True)
        with torch.inference_mode(), inference.autocast_for(trained.device, trained.amp_dtype):
            prob = torch.sigmoid(trained.model(xin)[0, 0].float()).numpy()
        pred = np.array(Image.fromarray((prob > trained.threshold).astype(np.uint8)).resize(
            (photo.shape[1], photo.shape[0]), Image.NEAREST))
        target = lut[train_ids]
        valid = target != 255
        tp += np.sum((pred == 1) & (target == 1) & valid)
        fp += np.sum((pred == 1) & (target == 0) & valid)
        fn += np.sum((pred == 0) & (target == 1) & valid)
    assert counts.sum() == sum((lut[read_sample(s, layout=index.layout, encoding=index.encoding)[1]] != 255).sum()
                               for s in index.samples["val"])  # every full-size labelled pixel counted
    expected = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    assert found["dice"] == pytest.approx(expected)


def test_calibration_never_lowers_dice_and_the_threshold_reaches_predict(trained_run, tmp_path):
    source_dir, result = trained_run
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(result.checkpoints["best"].read_bytes())
    trained = inference.load_trained(run_id=None, checkpoint=checkpoint, runs=source_dir / "runs")
    calibration = inference.calibrate(trained, split="val")
    assert calibration.thresholds[calibration.at_half] == pytest.approx(0.5)
    assert calibration.dice[calibration.best] >= calibration.dice[calibration.at_half]
    found, _ = inference.evaluate(trained, split="val", full_resolution=False)
    assert calibration.dice[calibration.at_half] == pytest.approx(found["dice"], abs=1e-3)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--calibrate", "--write-threshold",
                 "--runs", str(source_dir / "runs")]) == 0
    again = inference.load_trained(run_id=None, checkpoint=checkpoint, runs=source_dir / "runs")
    assert again.threshold == pytest.approx(calibration.thresholds[calibration.best])


def test_predict_writes_masks_and_overlays_of_each_inputs_size_and_skips_corrupt_files(trained_run, tmp_path, capsys):
    source_dir, result = trained_run
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 120, 3), dtype=np.uint8)).save(images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    single = tmp_path / "c.jpeg"
    Image.fromarray(rng.integers(0, 256, (97, 41, 3), dtype=np.uint8)).save(single)
    out = tmp_path / "out"
    code = main(["predict", "--run", result.run_id, "--runs", str(source_dir / "runs"), str(images), str(single),
                 "--out", str(out), "--probabilities"])
    assert code == 2  # one input was skipped
    assert "broken.png: unreadable" in capsys.readouterr().err
    for stem, (h, w) in {"a": (50, 70), "b": (33, 120), "c": (97, 41)}.items():
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(out / f"{stem}_overlay.png").size == (w, h)
        assert Image.open(out / f"{stem}_prob.png").size == (w, h)


def test_unknown_run_or_run_without_model_is_a_clear_error(trained_run, capsys):
    source_dir, result = trained_run
    with pytest.raises(CitysegError, match="run 'nope' not found"):
        inference.load_trained(run_id="nope", checkpoint=None, runs=source_dir / "runs")
    assert main(["evaluate", "--run", "nope", "--runs", str(source_dir / "runs")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["predict", "--run", "x", "--runs", str(source_dir / "elsewhere"), "img.png", "--out", "o"]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_evaluate_logs_a_linked_run(trained_run, capsys):
    source_dir, result = trained_run
    assert main(["evaluate", "--run", result.run_id, "--runs", str(source_dir / "runs")]) == 0
    client = MlflowClient(tracking_uri=tracking_uri(source_dir / "runs"))
    experiment = client.get_experiment_by_name("quickstart")
    linked = client.search_runs([experiment.experiment_id], f"tags.source_run = '{result.run_id}'")
    (evaluation,) = [r for r in linked if r.data.tags["checkpoint"] == str(result.checkpoints["best"])]
    assert evaluation.info.status == "FINISHED" and "val/dice" in evaluation.data.metrics
    assert "samples/val.png" in {a.path for a in client.list_artifacts(evaluation.info.run_id, "samples")}
