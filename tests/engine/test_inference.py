"""Evaluate, predict and calibrate a trained model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image

from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.data.cityscapes import id_to_train_id_lut
from cityseg.data.datasets import data_index, task_lut
from cityseg.data.layouts import read_sample
from cityseg.data.synthetic import render_scene
from cityseg.engine import checkpoints, inference, runner
from cityseg.errors import CitysegError
from cityseg.metrics import confusion_record
from cityseg.tracking import tracking_uri
from tests.conftest import CITYSCAPES_MINI, QUICKSTART, tiny_overrides
from tests.data.test_layouts import png_header


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny binary training run shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("trained")
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2),
                                       "tracking.log_model=false", "loss.pos_weight=4"])
    result = runner.run(exp)
    return tmp_path, result


def test_evaluate_reproduces_the_validation_metrics_training_logged(trained_run):
    tmp_path, result = trained_run
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    trained = inference.load_trained(run_id=None, checkpoint=result.checkpoints["last"],
                                     runs=tmp_path / "runs")
    found, _ = inference.evaluate(trained, split="val", full_resolution=False)
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
    trained = inference.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=tmp_path / "runs", overrides=["trainer.precision=fp32"])
    found, counts = inference.evaluate(trained, split="val", full_resolution=True)
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

    trained = inference.load_trained(run_id=None, checkpoint=result.checkpoints["best"], runs=runs)
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
    trained = inference.load_trained(run_id=None, checkpoint=checkpoint, runs=runs,
                                     overrides=[f"data.root={CITYSCAPES_MINI}"])
    found, counts = inference.evaluate(trained, split="val", full_resolution=True)
    assert (counts[1, 1], counts[0, 1], counts[1, 0]) == (tp, fp, fn)
    assert found["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert found["recall"] == pytest.approx(tp / (tp + fn))
    assert found["iou"] == pytest.approx(tp / (tp + fp + fn))


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


def test_predict_writes_masks_and_overlays_of_each_inputs_size_and_skips_corrupt_files(
        trained_run, tmp_path, capsys):
    source_dir, result = trained_run
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 120, 3), dtype=np.uint8)).save(
        images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    single = tmp_path / "c.jpeg"
    Image.fromarray(rng.integers(0, 256, (97, 41, 3), dtype=np.uint8)).save(single)
    out = tmp_path / "out"
    code = main(["predict", "--run", result.run_id, "--runs", str(source_dir / "runs"),
                 str(images), str(single), "--out", str(out), "--probabilities"])
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
    assert main(["predict", "--run", "x", "--runs", str(source_dir / "elsewhere"),
                 "img.png", "--out", "o"]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_evaluate_logs_a_linked_run(trained_run, capsys, tmp_path):
    source_dir, result = trained_run
    assert main(["evaluate", "--run", result.run_id, "--runs", str(source_dir / "runs")]) == 0
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


def test_load_trained_takes_a_runs_last_checkpoint_when_asked(trained_run):
    source_dir, result = trained_run
    runs = source_dir / "runs"
    last = inference.load_trained(run_id=result.run_id, checkpoint=None, runs=runs, which="last")
    assert last.path == checkpoints.path_of(runs, result.run_id, "last")
    weights = checkpoints.load(last.path)["model"]
    placed = last.predictor.model.state_dict()
    assert placed.keys() == weights.keys()
    assert all(torch.equal(placed[k].cpu(), weights[k]) for k in weights)


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
    trained = inference.load_trained(run_id=result.run_id, checkpoint=None, runs=tmp_path / "runs")
    images, _ = next(iter(inference.split_loader(trained, "val")))
    assert tuple(images.shape[-2:]) == (64, 128)
    assert main(["evaluate", "--run", result.run_id, "--runs", str(tmp_path / "runs"),
                 "--inference", "whole", "--tta", "flip"]) == 0
    evals = [r for r in client.search_runs([run.info.experiment_id])
             if r.data.tags.get("source_run") == result.run_id]
    assert [r.data.tags["inference"] for r in evals] == ["whole + flip"]


def test_a_kept_scale_without_a_crop_is_refused():
    with pytest.raises(Exception, match=r"data\.scale \[64, 128\] differs .* add random_crop"):
        load_experiment(QUICKSTART, ["data.scale=[64,128]", "data.image_size=[32,64]",
                                     "augment=[{name: hflip}]"])


def test_predict_skips_images_it_should_not_decode_names_them_and_writes_the_rest(
        trained_run, tmp_path, capsys):
    source_dir, result = trained_run
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "b_bomb.png").write_bytes(png_header(10_000, 9_000))
    (images / "c_truncated.png").write_bytes((images / "a.png").read_bytes()[:80])
    Image.fromarray(rng.integers(0, 256, (25, 35, 3), dtype=np.uint8)).save(images / "d.png")
    out = tmp_path / "out"
    code = main(["predict", "--run", result.run_id, "--runs", str(source_dir / "runs"),
                 str(images), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"skipped: {images / 'b_bomb.png'}: not decoded: 90,000,000 pixels, over PIL's "
            f"limit") in err
    assert f"skipped: {images / 'c_truncated.png'}: unreadable (image file is truncated" in err
    assert "2 input(s) skipped" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png",
                                                      "d_mask.png", "d_overlay.png"]


def test_predict_refuses_an_out_that_is_a_file_before_loading_a_model(tmp_path, capsys):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"x")
    for out, what in ((taken, "is a file"), (taken / "sub", f"is inside {taken}, a file")):
        # no such run or store either: --out is checked first
        assert main(["predict", "--run", "nope", "--runs", str(tmp_path / "nowhere"),
                     str(taken), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: --out {out}: {what}; give a folder (created if missing)" in err
    assert taken.read_bytes() == b"x"


def test_a_16bit_greyscale_png_gives_the_same_mask_as_its_8bit_version(trained_run, tmp_path):
    source_dir, result = trained_run
    photo, _ = render_scene(np.random.default_rng(5), 48, 96)
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    (tmp_path / "eight").mkdir()
    (tmp_path / "sixteen").mkdir()
    Image.fromarray(grey).save(tmp_path / "eight" / "scene.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen" / "scene.png")
    assert Image.open(tmp_path / "sixteen" / "scene.png").mode == "I;16"
    trained = inference.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=source_dir / "runs")
    masks = []
    for bits in ("eight", "sixteen"):
        written, skipped = inference.predict_files(trained, [tmp_path / bits],
                                                   tmp_path / f"out_{bits}", probabilities=True)
        assert len(written) == 1 and not skipped
        masks.append(np.asarray(Image.open(written[0])))
        for kind in ("overlay", "prob"):
            assert (Image.open(tmp_path / f"out_{bits}" / f"scene_{kind}.png").tobytes()
                    == Image.open(tmp_path / "out_eight" / f"scene_{kind}.png").tobytes())
    np.testing.assert_array_equal(masks[0], masks[1])
    # the barely trained model may find no foreground: its probabilities show what it saw
    _, white = trained.predictor.predict_photo(np.full((48, 96, 3), 255, np.uint8))
    seen = np.asarray(Image.open(tmp_path / "out_sixteen" / "scene_prob.png"))
    assert not np.array_equal(seen, (white * 255).round().astype(np.uint8))  # not all-white


def test_predict_masks_refuses_arrays_a_uint8_cast_would_change(trained_run):
    source_dir, result = trained_run
    trained = inference.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=source_dir / "runs")
    photo = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(inference.predict_masks(trained, photo.astype(np.int64)),
                                  inference.predict_masks(trained, photo))
    for bad, found in ((photo.astype(np.uint16) * 257, r"uint16 with values \d+\.\.\d+"),
                       (photo / 255, r"float64 with values"), (photo > 0, "bool")):
        with pytest.raises(CitysegError, match=rf"whole values 0\.\.255 \(uint8\), got {found}"):
            inference.predict_masks(trained, bad)
