"""What a run records, as MLflow's users know it: standard tags, datasets, system metrics, the
registered model with its metrics, and the fixed validation samples as step-indexed images (one
key per sample, step 0 the untrained model, then one step per epoch, in every run, a sweep's
children too); everything read back through MlflowClient."""

import getpass
import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from cityseg.config import load_experiment
from cityseg.data.datasets import data_index, reader_for
from cityseg.sweep import run_sweep
from cityseg.tracking import tracking_uri
from cityseg.train import runner
from tests.conftest import NO_MODEL, QUICKSTART, REPO, tiny_overrides
from tests.sweep.tiny import runs, write_sweep


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
    assert metrics["val/best/dice"].value == pytest.approx(best[0].value)
    assert metrics["val/best/dice"].step == result.best_epoch and "val/best/iou" in metrics
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


# ------------------------------------------------------------------ the samples as images

KEYS = ("val/sample_0", "val/sample_1")  # tiny_overrides: tracking.num_samples=2


def step_images(client: MlflowClient, run_id: str) -> dict[tuple[str, int], list[str]]:
    """(key, step) -> what MlflowClient.log_image(key=, step=) wrote for it, as the UI reads
    it: images/<key, '/' as '~'>+step+<step>+timestamp+<ms>+<uuid>.png and a
    <same>+compressed.webp thumbnail beside it (MLflow has no call that lists them)."""
    found: dict[tuple[str, int], list[str]] = {}
    for info in client.list_artifacts(run_id, "images"):
        key, step_word, step, time_word, _ms, rest = info.path.removeprefix("images/").split(
            "+", 5)
        assert (step_word, time_word) == ("step", "timestamp"), info.path
        kind = "thumbnail" if rest.endswith("+compressed.webp") else "image"
        found.setdefault((key.replace("~", "/"), int(step)), []).append(kind)
    return found


def logged_image(client: MlflowClient, run_id: str, key: str, step: int) -> bytes:
    """The newest full-size image of `key` at `step` (the one the UI shows), as bytes."""
    prefix = f"images/{key.replace('/', '~')}+step+{step}+timestamp+"
    newest = max(i.path for i in client.list_artifacts(run_id, "images")
                 if i.path.startswith(prefix) and i.path.endswith(".png"))
    return Path(client.download_artifacts(run_id, newest)).read_bytes()


def every_key_once(steps) -> dict[tuple[str, int], list[str]]:
    return {(key, step): ["image", "thumbnail"] for key in KEYS for step in steps}


def test_each_sample_is_an_image_at_every_epoch_and_resuming_goes_on(tmp_path):
    overrides = [*tiny_overrides(tmp_path, epochs=2), NO_MODEL]
    result = runner.run(load_experiment(QUICKSTART, overrides))
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    found = step_images(client, result.run_id)
    # each epoch's, and at step 0 (where MLflow's cards open) the last epoch's again
    assert {k: sorted(v) for k, v in found.items()} == every_key_once((0, 1, 2))
    for key in KEYS:
        assert logged_image(client, result.run_id, key, 0) == logged_image(client, result.run_id,
                                                                           key, 2)
    assert client.get_run(result.run_id).data.tags["mlflow.loggedImages"] == "True"
    images = {i.path for i in client.list_artifacts(result.run_id, "images")}
    card = next(p for p in sorted(images) if p.endswith(".png"))
    with Image.open(client.download_artifacts(result.run_id, card, str(tmp_path))) as image:
        assert image.mode == "RGB" and image.height * 2 > image.width  # one sample, not a strip
    thumb = next(p for p in sorted(images) if p.endswith(".webp"))
    with Image.open(client.download_artifacts(result.run_id, thumb, str(tmp_path))) as image:
        assert max(image.size) == 256
    panels = [a.path for a in client.list_artifacts(result.run_id, "samples")]
    assert panels == ["samples/epoch_001.png", "samples/epoch_002.png"]  # full size, as before

    # the same run, trained on: each epoch's picture once; its epochs now say 3
    more = runner.run(load_experiment(QUICKSTART, [*overrides, "trainer.epochs=3"]),
                      resume=result.run_id)
    assert more.run_id == result.run_id and more.resumed_from == 2
    found = step_images(client, result.run_id)
    assert {(k, step) for k, step in found} == set(every_key_once((0, 1, 2, 3)))
    # step 0 once more, the newest (which the UI shows) being epoch 3's
    for key in KEYS:
        assert sorted(found[(key, 0)]) == ["image", "image", "thumbnail", "thumbnail"]
        assert logged_image(client, result.run_id, key, 0) == logged_image(client, result.run_id,
                                                                           key, 3)
    run = client.get_run(result.run_id)
    assert run.data.tags["trainer.epochs"] == "3" and "trainer.epochs" not in run.data.params
    logged = client.download_artifacts(result.run_id, "config.yaml", str(tmp_path / "again"))
    assert load_experiment(logged).trainer.epochs == 3


@pytest.mark.slow  # a two-child sweep: about 40 s on two cores
def test_sweep_children_log_the_same_sample_keys(tmp_path):
    run_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 4]}), report=lambda line: None)
    client, parents, children = runs(tmp_path)
    assert len(children) == 2
    for child in children:
        found = step_images(client, child.info.run_id)
        assert {k: sorted(v) for k, v in found.items()} == every_key_once((0, 1, 2))
