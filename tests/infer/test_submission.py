"""`cityseg predict --format cityscapes`: files the Cityscapes benchmark server (and the
official evaluator it runs) accepts, scored by that evaluator exactly as cityseg scores them."""

import copy
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image

from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.data.cityscapes import TRAIN_CLASSES
from cityseg.infer import evaluation, loading
from cityseg.train import runner
from tests.conftest import CITYSCAPES_MINI, QUICKSTART, random_model, tiny_overrides

needs_mini = pytest.mark.skipif(not CITYSCAPES_MINI.is_dir(),
                                reason="../shared/data/cityscapes-mini absent")


@pytest.fixture(scope="module", params=["untrained", pytest.param("trained",
                                                                  marks=pytest.mark.slow)])
def mini_model(request, tmp_path_factory) -> Path:
    """A tiny 19-class model: untrained (its labels vary over the frame, a few overlap the
    ground truth; made in a second), or trained for 3 epochs on the 6 cityscapes-mini train
    frames (about 15 s: it finds some building, vegetation and sky in the val frames)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    if request.param == "untrained":
        return random_model(tmp_path, "multiclass")
    overrides = [*tiny_overrides(tmp_path, epochs=3), "tracking.log_model=false",
                 "data.name=cityscapes", f"data.root={CITYSCAPES_MINI}", "data.task=multiclass",
                 "loss={name: cross_entropy}", "augment=[]", "data.batch_size=2",
                 "optimizer.lr=0.02"]
    synthetic_only = ("data.num_train=", "data.num_val=", "data.source_size=")
    exp = load_experiment(QUICKSTART, [o for o in overrides if not o.startswith(synthetic_only)])
    return runner.run(exp).checkpoints["best"]


def _official_args():
    """The evaluator's settings, as its main() would use them, for these files: no instance
    scores (cityscapes-mini has no *_instanceIds.png) and no JSON file written."""
    args = copy.copy(official.args)
    args.predictionPath = args.predictionWalk = None  # found again from CITYSCAPES_RESULTS
    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.colorized = False, False, True, False
    return args


@needs_mini
def test_the_official_evaluator_scores_the_files_as_evaluate_full_resolution(
        mini_model, tmp_path, monkeypatch):
    frames = sorted((CITYSCAPES_MINI / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    out, archive = tmp_path / "results", tmp_path / "submission.zip"
    assert main(["predict", "--checkpoint", str(mini_model), str(frames[0].parents[1]),
                 "--out", str(out), "--format", "cityscapes", "--zip", str(archive)]) == 0
    names = sorted(frame.name for frame in frames)  # the frames' own names, .png
    assert sorted(os.listdir(out)) == names
    with zipfile.ZipFile(archive) as packed:
        assert sorted(packed.namelist()) == names

    # the evaluator's own search (main() without arguments): one prediction per ground truth,
    # or it exits with "Found no / multiple predictions"
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(out))
    args = _official_args()
    truths = sorted(str(p) for p in (CITYSCAPES_MINI / "gtFine" / "val").rglob(
        "*_gtFine_labelIds.png"))
    predictions = [official.getPrediction(args, truth) for truth in truths]
    assert [Path(p).name for p in predictions] == names
    result = official.evaluateImgLists(predictions, truths, args)

    trained = loading.load_trained(run_id=None, checkpoint=mini_model, runs=tmp_path / "runs",
                                     overrides=["data.name=cityscapes",
                                                f"data.root={CITYSCAPES_MINI}"])
    found, counts = evaluation.evaluate(trained, split="val", full_resolution=True)
    assert int(np.asarray(result["confMatrix"]).sum()) == len(truths) * 1024 * 2048  # all
    # Like with like. The evaluator gives every label an IoU: NaN for the 15 ignoreInEval
    # ones, and NaN for an evaluated class with tp + fp + fn = 0 (absent from both ground
    # truth and prediction), and averages the others. cityseg leaves out the classes absent
    # from both (its rule: present in ground truth or prediction, i.e. tp + fp + fn > 0, with
    # fp counted on labelled pixels as the evaluator does) and averages the rest. So: the same
    # set of classes, the same IoUs, the same mean.
    scored = {name: iou for name, iou in result["classScores"].items() if not math.isnan(iou)}
    assert set(scored) == {name for name in TRAIN_CLASSES
                           if f"iou/{name.replace(' ', '_')}" in found}
    assert len(scored) < len(TRAIN_CLASSES)  # some class is in neither: the rule is exercised
    for name, iou in scored.items():
        assert found[f"iou/{name.replace(' ', '_')}"] == pytest.approx(iou, abs=1e-6), name
    assert found["miou"] == pytest.approx(result["averageScoreClasses"], abs=1e-6)
    assert counts.sum(0).gt(0).sum() >= 3  # a model that predicts several classes
    assert any(iou > 0 for iou in scored.values())  # and finds some

    # the control: a second file of one frame in the folder, and the evaluator refuses it
    extra = tmp_path / "twice"
    extra.mkdir()
    for name in (names[0], names[0].replace("_leftImg8bit", "_leftImg8bit_overlay")):
        (extra / name).write_bytes((out / names[0]).read_bytes())
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(extra))
    with pytest.raises(SystemExit):
        official.getPrediction(_official_args(), truths[0])


def test_label_ids_of_each_frame_at_its_size_named_after_it_and_zipped_flat(tmp_path):
    model = random_model(tmp_path, "multiclass")
    rng = np.random.default_rng(0)
    inputs = {tmp_path / "in" / "berlin" / "berlin_000000_000019_leftImg8bit.png": (48, 80),
              tmp_path / "in" / "bonn" / "bonn_000001_000019_leftImg8bit.jpg": (37, 91)}
    for path, (h, w) in inputs.items():
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    out, archive = tmp_path / "out", tmp_path / "zips" / "results.zip"
    assert main(["predict", "--checkpoint", str(model), str(tmp_path / "in"), "--out", str(out),
                 "--format", "cityscapes", "--zip", str(archive)]) == 0
    names = ["berlin_000000_000019_leftImg8bit.png", "bonn_000001_000019_leftImg8bit.png"]
    assert sorted(os.listdir(out)) == names
    with zipfile.ZipFile(archive) as packed:
        assert sorted(packed.namelist()) == names  # flat: no folders
        zipped = {name: np.asarray(Image.open(packed.open(name))) for name in names}
    trained = loading.load_trained(run_id=None, checkpoint=model, runs=tmp_path / "runs")
    # cityscapesScripts' own table: train id -> label id
    to_id = np.array([trainId2label[t].id for t in range(len(TRAIN_CLASSES))], np.uint8)
    for path, name in zip(sorted(inputs), names, strict=True):
        written = Image.open(out / name)
        labels, _ = trained.predictor.predict_photo(np.asarray(Image.open(path).convert("RGB")))
        assert written.mode == "L" and written.size == Image.open(path).size
        np.testing.assert_array_equal(np.asarray(written), to_id[labels])
        np.testing.assert_array_equal(zipped[name], np.asarray(written))
    assert len(np.unique(np.asarray(Image.open(out / names[0])))) >= 3  # many ids mapped


@pytest.mark.parametrize(("setup", "flags", "message"), [
    ("binary", [], r"--format cityscapes needs a model of the 19 Cityscapes classes \(data\.task: "
                   r"multiclass\); this one is binary"),
    ("twice", [], r"in/a/x\.png and .*in/b/x\.jpg would both be predicted as x\.png: the "
                  r"benchmark matches predictions to frames by name"),
    ("taken", [], r"--out .*out holds 1 other file\(s\) \(x_mask\.png\); the benchmark folder "
                  r"must hold the predictions only"),
    ("video", [], r"drive\.mp4: a video; --format cityscapes writes benchmark files for frames"),
    ("zip inside", ["--zip", "{out}/results.zip"], r"inside --out .*, which must hold the "
                                                   r"predictions only"),
])
def test_what_the_server_would_refuse_is_refused_before_anything_is_written(
        tmp_path, capsys, setup, flags, message):
    model = random_model(tmp_path, "binary" if setup == "binary" else "multiclass")
    (tmp_path / "in" / "a").mkdir(parents=True)
    photo = Image.fromarray(np.zeros((16, 24, 3), np.uint8))
    photo.save(tmp_path / "in" / "a" / "x.png")
    out = tmp_path / "out"
    if setup == "twice":
        (tmp_path / "in" / "b").mkdir()
        photo.save(tmp_path / "in" / "b" / "x.jpg")
    if setup == "taken":
        out.mkdir()
        photo.save(out / "x_mask.png")
    if setup == "video":
        (tmp_path / "in" / "drive.mp4").write_bytes(b"")
    before = sorted(out.rglob("*")) if out.exists() else None
    flags = [flag.format(out=out) for flag in flags]
    assert main(["predict", "--checkpoint", str(model), str(tmp_path / "in"), "--out", str(out),
                 "--format", "cityscapes", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert (sorted(out.rglob("*")) if out.exists() else None) == before


def test_zip_and_probabilities_belong_to_their_format(tmp_path, capsys):
    for flags, message in ((["--zip", "r.zip"], "--zip packs the files of --format cityscapes"),
                           (["--format", "cityscapes", "--probabilities"],
                            "--probabilities is for --format files")):
        # checked first: no such model is ever loaded
        assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "x.png",
                     "--out", str(tmp_path / "out"), *flags]) == 2
        assert message in capsys.readouterr().err
