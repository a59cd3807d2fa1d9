"""The logged model: an MLflow pyfunc that predicts what `cityseg predict` writes, in this process,
in a process without cityseg, and served by `mlflow models serve`."""

import json
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pytest
from PIL import Image

from cityseg.cli import main
from cityseg.tracking import tracking_uri
from tests.conftest import frame, mlflow_process


def test_the_logged_model_is_a_pyfunc_that_predicts_what_cityseg_predict_writes(finished,
                                                                              monkeypatch):
    tmp_path, exp, result, client, run = finished
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tmp_path / "runs"))
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    path, photo = frame()
    image = tmp_path / "pyfunc.png"
    Image.fromarray(photo).save(image)
    assert main(["predict", "--run", run.info.run_id, "--runs", str(tmp_path / "runs"),
                 str(image), "--out", str(tmp_path / "pyfunc-out")]) == 0
    written = np.asarray(Image.open(tmp_path / "pyfunc-out" / "pyfunc_mask.png"))
    masks = model.predict(photo[None])
    assert masks.shape == (1, *photo.shape[:2]) and masks.dtype == np.uint8
    assert np.array_equal(masks[0], written)
    # the raw weights stay available as a safe state dict with the config
    files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= files


FRESH = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import importlib.util
assert importlib.util.find_spec("cityseg") is None, "cityseg is importable"
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3])))
"""


def test_the_logged_model_predicts_in_a_process_without_cityseg(finished, monkeypatch):
    """Only MLflow and the recorded requirements: cityseg comes with the model as its code."""
    tmp_path, exp, result, client, run = finished
    folder = tmp_path / "fresh"
    folder.mkdir()
    path, photo = frame()
    np.save(folder / "in.npy", photo[None])
    done = subprocess.run([sys.executable, "-c", FRESH, tracking_uri(tmp_path / "runs"),
                           run.data.tags["model_uri"], "in.npy", "out.npy"], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tmp_path / "runs"))
    here = mlflow.pyfunc.load_model(run.data.tags["model_uri"]).predict(photo[None])
    assert np.array_equal(np.load(folder / "out.npy"), here)


@pytest.mark.slow  # about 30 s on two quiet cores: `make test-slow`
def test_mlflow_models_serve_answers_with_the_mask_predict_writes(finished):
    tmp_path, exp, result, client, run = finished
    path, photo = frame()
    with mlflow_process("models", "serve", "-m", run.data.tags["model_uri"], "--env-manager",
                        "local", ready="/ping",
                        env={"MLFLOW_TRACKING_URI": tracking_uri(tmp_path / "runs")}) as url:
        body = json.dumps({"inputs": photo[None].tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            served = np.array(json.loads(response.read())["predictions"], dtype=np.uint8)
    image = tmp_path / "served.png"
    Image.fromarray(photo).save(image)
    assert main(["predict", "--run", run.info.run_id, "--runs", str(tmp_path / "runs"),
                 str(image), "--out", str(tmp_path / "served-out")]) == 0
    written = np.asarray(Image.open(tmp_path / "served-out" / "served_mask.png"))
    assert served.shape == (1, *photo.shape[:2]) and np.array_equal(served[0], written)
