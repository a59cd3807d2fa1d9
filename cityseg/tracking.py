"""MLflow tracking: the only module that imports mlflow.

The store is always explicit: `sqlite:///<dir>/mlflow.db` with artifacts under
`<dir>/artifacts`, never MLflow's default of whatever the working directory holds.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from cityseg.errors import CitysegError

_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


class Tracker:
    """One MLflow run: params, per-epoch metrics, images and files, ended with a status."""

    def __init__(self, *, root: Path, experiment: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
        self.root = root
        self.client = MlflowClient(tracking_uri=tracking_uri(root))
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = (root / "artifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id: str | None = None

    def start(self, *, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def reattach(self, run_id: str) -> None:
        """Continue logging to an earlier run (resume): it is RUNNING again until end()."""
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def resumable_run(self, config_hash: str) -> str | None:
        """The newest run of this experiment with this config that did not finish."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.config_hash = '{config_hash}'",
            order_by=["attributes.start_time DESC"])
        return next((r.info.run_id for r in runs if r.info.status != "FINISHED"), None)

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log_model(self, model: torch.nn.Module, example: np.ndarray) -> str:
        """Log `model` with a signature and an input example; returns its model URI."""
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.client.tracking_uri)
        logging.getLogger("torch._export").setLevel(logging.ERROR)  # export notes on the example's batch size
        model.eval()
        with torch.inference_mode():
            output = model(torch.from_numpy(example)).float().numpy()
        signature = infer_signature(example, output)
        # start_run's exit marks the run FINISHED; end() sets the true status right after
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                            serialization_format="pickle",  # loads back as the UNet class
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        self.client.set_tag(self.run_id, "model_uri", info.model_uri)
        return info.model_uri

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED (never left RUNNING)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"not a terminal run status: {status!r}")
        self.client.set_terminated(self.run_id, status=status)


def mlflow_version() -> str:
    return mlflow.__version__


def fetch_config(root: Path, run_id: str) -> str:
    """The resolved config.yaml that run `run_id` logged, as text."""
    client = MlflowClient(tracking_uri=tracking_uri(root))
    try:
        client.get_run(run_id)
    except MlflowException:
        raise CitysegError(f"run {run_id!r} not found in {root / 'mlflow.db'}") from None
    try:
        return client.download_artifacts(run_id, "config.yaml", tempfile.mkdtemp(prefix="cityseg-"))
    except (MlflowException, OSError):
        raise CitysegError(f"run {run_id} has no config.yaml artifact") from None
