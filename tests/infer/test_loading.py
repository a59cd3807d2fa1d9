"""Loading a trained model from a run or a checkpoint, and predict_masks on arrays."""

import numpy as np
import pytest
import torch

from cityseg import checkpoints
from cityseg.cli import main
from cityseg.errors import CitysegError
from cityseg.infer import loading


def test_unknown_run_or_run_without_model_is_a_clear_error(trained_run, capsys):
    source_dir, result = trained_run
    with pytest.raises(CitysegError, match="run 'nope' not found"):
        loading.load_trained(run_id="nope", checkpoint=None, runs=source_dir / "runs")
    assert main(["evaluate", "--run", "nope", "--runs", str(source_dir / "runs")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["predict", "--run", "x", "--runs", str(source_dir / "elsewhere"),
                 "img.png", "--out", "o"]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_load_trained_takes_a_runs_last_checkpoint_when_asked(trained_run):
    source_dir, result = trained_run
    runs = source_dir / "runs"
    last = loading.load_trained(run_id=result.run_id, checkpoint=None, runs=runs, which="last")
    assert last.path == checkpoints.path_of(runs, result.run_id, "last")
    weights = checkpoints.load(last.path)["model"]
    placed = last.predictor.model.state_dict()
    assert placed.keys() == weights.keys()
    assert all(torch.equal(placed[k].cpu(), weights[k]) for k in weights)


def test_predict_masks_refuses_arrays_a_uint8_cast_would_change(trained_run):
    source_dir, result = trained_run
    trained = loading.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=source_dir / "runs")
    photo = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loading.predict_masks(trained, photo.astype(np.int64)),
                                  loading.predict_masks(trained, photo))
    for bad, found in ((photo.astype(np.uint16) * 257, r"uint16 with values \d+\.\.\d+"),
                       (photo / 255, r"float64 with values"), (photo > 0, "bool")):
        with pytest.raises(CitysegError, match=rf"whole values 0\.\.255 \(uint8\), got {found}"):
            loading.predict_masks(trained, bad)
