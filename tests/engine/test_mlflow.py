"""MLflow as its users know it: standard tags, datasets, system metrics, a servable registered
model with its metrics; everything read back through MlflowClient."""

import getpass
import json
import os
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.data.datasets import data_index, reader_for
from cityseg.engine import runner
from cityseg.tracking import tracking_uri
from tests.conftest import CITYSCAPES_MINI, QUICKSTART, REPO, mlflow_process, tiny_overrides


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny quickstart run with a description and a registered model."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2),
                                       "description=tiny streets, two epochs",
                                       "tracking.register_model=streets"])
    with pytest.MonkeyPatch.context() as patch:  # sample system metrics often in a short run
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        result = runner.run(exp)
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    return tmp_path, exp, result, client, client.get_run(result.run_id)


def frame():
    """A real Cityscapes frame if the shared data is there, else a synthetic street."""
    found = sorted(CITYSCAPES_MINI.glob("leftImg8bit/val/*/*_leftImg8bit.png"))
    if found:
        return found[0], np.asarray(Image.open(found[0]).convert("RGB"))
    return None, np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)


def test_the_run_carries_mlflows_standard_tags_and_description(finished):
    tmp_path, exp, result, client, run = finished
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit and "git_commit" not in tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.runName"] == "quickstart"
    assert tags["mlflow.note.content"] == "tiny streets, two epochs"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert result.url.endswith(f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")


def test_the_splits_are_dataset_inputs_with_their_fingerprints(finished):
    tmp_path, exp, result, client, run = finished
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    index = data_index(exp.data, ("train", "val"))
    for context, split in (("training", "train"), ("validation", "val")):
        dataset = inputs[context]
        assert dataset.digest == reader_for(exp.data, index, split)[1]  # independently
        assert dataset.name == f"synthetic-official-binary-{split}"
        assert json.loads(dataset.source)["uri"] == str(exp.data.root.resolve())
        profile = json.loads(dataset.profile)
        assert profile["images"] == {"train": 6, "val": 3}[split]
        assert profile["image_size"] == [32, 64] and 0 < profile["foreground_fraction"] < 1


def test_system_metrics_are_logged(finished):
    tmp_path, exp, result, client, run = finished
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert history and all(0 <= m.value <= 100 * os.cpu_count() for m in history)
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_the_model_is_registered_with_its_metrics(finished):
    tmp_path, exp, result, client, run = finished
    (version,) = client.search_model_versions("name = 'streets'")
    assert version.run_id == run.info.run_id and run.data.tags["registered_model"] == \
        "models:/streets/1"
    model = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
    metrics = {m.key: m for m in model.metrics}
    best = [m for m in client.get_metric_history(run.info.run_id, "val/dice")
            if m.step == result.best_epoch]
    assert metrics["best/val/dice"].value == pytest.approx(best[0].value)
    assert metrics["best/val/dice"].step == result.best_epoch and "best/val/iou" in metrics
    assert len(client.get_metric_history(run.info.run_id, "val/dice")) == 2  # one per epoch
    # named after the run and the network; only its own metrics, each linked to the dataset
    # it was scored on (the run's validation input); the run's output at the best epoch
    assert model.name == "quickstart-unet" and str(model.status) == "READY"
    assert not [key for key in metrics if key.startswith("system/")]
    validation = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}["validation"]
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {
        (validation.name, validation.digest)}
    (output,) = run.outputs.model_outputs
    assert output.model_id == model.model_id and output.step == result.best_epoch


def test_promote_and_registered_models_serve_evaluate_and_predict(finished, capsys):
    tmp_path, exp, result, client, run = finished
    runs = str(tmp_path / "runs")
    assert main(["promote", run.info.run_id, "--alias", "champion", "--runs", runs]) == 0
    assert str(client.get_model_version_by_alias("streets", "champion").version) == "1"
    path, photo = frame()
    image = tmp_path / "frame.png"
    Image.fromarray(photo).save(image)
    out = tmp_path / "by-alias"
    assert main(["predict", "--model", "models:/streets@champion", "--runs", runs, str(image),
                 "--out", str(out)]) == 0
    assert main(["predict", "--run", run.info.run_id, "--runs", runs, str(image),
                 "--out", str(tmp_path / "by-run")]) == 0
    by_alias = np.asarray(Image.open(out / "frame_mask.png"))
    assert np.array_equal(by_alias, np.asarray(Image.open(tmp_path / "by-run/frame_mask.png")))
    assert main(["evaluate", "--model", "models:/streets/1", "--runs", runs, "--no-log"]) == 0
    assert main(["evaluate", "--model", "models:/streets/7", "--runs", runs, "--no-log"]) == 2
    assert "not in the registry" in capsys.readouterr().err


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
