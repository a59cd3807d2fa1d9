"""End to end: the real quickstart experiment, shrunk, tracked in a temporary MLflow store; and
what the runner checks before training on several processes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cityseg.config import load_experiment
from cityseg.errors import ConfigError
from cityseg.registry import DATASETS, BuildContext
from cityseg.runtime import distributed
from cityseg.train import runner
from cityseg.train.trainer import Trainer
from tests.conftest import NO_MODEL, QUICKSTART, only_run, runs_of, tiny_overrides

EPOCH_METRICS = ["train/loss", "val/loss", "val/dice", "val/iou", "val/precision", "val/recall",
                 "val/accuracy", "val/bf_score", "val/boundary_iou", "lr",
                 "throughput/img_s"]


def artifact_paths(client, run_id, path=None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_tiny_run_tracks_params_metrics_panels_and_checkpoints(tiny_experiment, tmp_path):
    result = runner.run(tiny_experiment)
    client, run = only_run(tmp_path / "runs")

    assert run.info.status == "FINISHED" and run.info.run_id == result.run_id
    # a few params (MLflow heads each image card with them all); the whole config is an artifact
    assert run.data.params == {"seed": str(tiny_experiment.seed), "model.depth": "2",
                               "model.encoder": "plain",
                               "loss.pos_weight": str(tiny_experiment.loss.pos_weight),
                               "optimizer.lr": str(tiny_experiment.optimizer.lr)}
    logged = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert load_experiment(logged) == tiny_experiment
    assert run.data.tags["trainer.epochs"] == str(tiny_experiment.trainer.epochs)
    assert run.data.tags["device"] == "cpu" and "mlflow.source.git.commit" in run.data.tags
    assert run.data.tags["data.layout"] == "official"
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    assert len(inputs["training"].digest) == 20 and inputs["training"].name.endswith("-train")
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert 0.0 <= run.data.metrics["val/dice"] <= 1.0
    assert run.data.metrics["val/dice"] == pytest.approx(result.metrics["val/dice"])

    artifacts = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "samples/epoch_001.png", "samples/epoch_002.png",
            "confusion_matrix.json", "data/class_frequencies.json", "checkpoints/best.pt",
            "checkpoints/last.pt"} <= artifacts

    config_file = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    config_text = Path(config_file).read_text()
    again = tmp_path / "again.yaml"
    again.write_text(config_text)
    assert load_experiment(again) == tiny_experiment

    checkpoint = torch.load(result.checkpoints["last"], weights_only=True)
    assert checkpoint["epoch"] == 2
    assert checkpoint["config"] == tiny_experiment.model_dump(mode="json")
    assert set(checkpoint["model"]) and "optimizer" in checkpoint


def test_run_that_raises_ends_failed_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    exp = load_experiment(QUICKSTART, tiny_overrides(tmp_path, epochs=3))
    calls = {"n": 0}
    original = Trainer.validate

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in epoch 2")
        return original(self)

    monkeypatch.setattr(Trainer, "validate", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(exp)
    client, run = only_run(tmp_path / "runs")
    assert run.info.status == "FAILED"
    assert "checkpoints/last.pt" in artifact_paths(client, run.info.run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice")] == [1]


def test_same_seed_gives_the_same_run(tmp_path):
    a = runner.run(load_experiment(QUICKSTART, tiny_overrides(tmp_path / "a", epochs=1)))
    b = runner.run(load_experiment(QUICKSTART, tiny_overrides(tmp_path / "b", epochs=1)))
    assert a.metrics["train/loss"] == pytest.approx(b.metrics["train/loss"], rel=1e-5)
    assert a.metrics["val/dice"] == pytest.approx(b.metrics["val/dice"], rel=1e-5)


def test_deterministic_runs_match_exactly(tmp_path):
    histories = []
    for folder in ("a", "b"):
        exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path / folder, epochs=2), NO_MODEL,
                                           "trainer.deterministic=true", "data.num_workers=1"])
        runner.run(exp)
        client, (run,) = runs_of(tmp_path / folder / "runs")
        histories.append({k: [m.value for m in client.get_metric_history(run.info.run_id, k)]
                          for k in ("train/loss", "val/loss", "val/dice", "val/bf_score")})
    assert histories[0] == histories[1]


def test_pos_weight_auto_uses_the_training_pixel_ratio(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=1), "loss.pos_weight=auto"])
    runner.run(exp)
    client, run = only_run(tmp_path / "runs")
    assert run.data.params["loss.pos_weight"] == "auto"
    counts = np.zeros(256, dtype=np.int64)  # count the resized training masks directly
    splits = DATASETS.build(exp.data, BuildContext("binary", 1, 255, exp.data.image_size),
                            train_transform=None)
    for i in range(len(splits.train)):
        counts += np.bincount(splits.train[i][1].numpy().ravel(), minlength=256)
    assert float(run.data.params["loss.pos_weight_used"]) == pytest.approx(counts[0] / counts[1],
                                                                          rel=1e-3)


def test_multiclass_run_logs_miou_confusion_image_and_class_table(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=1), "data.task=multiclass",
                                       "loss={name: cross_entropy}"])
    result = runner.run(exp)
    client, run = only_run(tmp_path / "runs")
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["val/miou"] <= 1.0 and "val/iou/road" in run.data.metrics
    assert 0.0 <= run.data.metrics["val/bf_score"] <= 1.0
    assert "val/dice" not in run.data.metrics
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"confusion_matrix.png", "per_class_iou.md", "samples/epoch_001.png"} <= artifacts
    assert result.best_score == pytest.approx(run.data.metrics["val/miou"])


def test_a_global_batch_that_does_not_divide_is_a_config_error(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path), "data.batch_size=3"])
    with pytest.raises(ConfigError, match="data.batch_size: 3 is the global batch .* 2 processes"):
        runner.check_world(exp, distributed.World(rank=0, size=2, backend="gloo"),
                           torch.device("cpu"))
    with pytest.raises(ConfigError, match="SyncBatchNorm does not exist on the CPU"):
        runner.check_world(exp.model_copy(update={"trainer": exp.trainer.model_copy(
            update={"sync_bn": True})}), distributed.World(), torch.device("cpu"))
