"""Shared fixtures: the REAL quickstart experiment, shrunk to seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityseg.config import Experiment, load_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
CITYSCAPES_MINI = REPO.parent / "shared" / "data" / "cityscapes-mini"


def tiny_overrides(tmp_path: Path, epochs: int = 2) -> list[str]:
    """Overrides that keep the quickstart's components but make it run in seconds."""
    return [
        f"data.root={tmp_path / 'synthetic'}", "data.num_train=6", "data.num_val=3",
        "data.source_size=[64,128]", "data.image_size=[32,64]", "data.batch_size=3",
        "data.num_workers=0", "model.depth=2", "model.base_channels=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"trainer.epochs={epochs}", "trainer.device=cpu", f"tracking.dir={tmp_path / 'runs'}",
        "tracking.num_samples=2",
    ]


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> Experiment:
    return load_experiment(QUICKSTART, tiny_overrides(tmp_path))


@pytest.fixture(autouse=True)
def _local_tracking(monkeypatch):
    """Tests track into their own temporary stores: never a server from the caller's shell,
    and never one an earlier test pointed MLflow's fluent API at."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)
