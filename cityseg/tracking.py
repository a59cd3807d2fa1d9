"""MLflow tracking: the only module that imports mlflow.

The store is always explicit: `sqlite:///<dir>/mlflow.db` with artifacts under
`<dir>/artifacts`, never MLflow's default of whatever the working directory holds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from cityseg.errors import CitysegError, Interrupted

_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


RETRIES = 10  # SQLite allows one writer at a time: parallel sweep children wait their turn


class _RetryingClient:
    """MlflowClient whose calls retry with exponential backoff while SQLite says it is locked."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for attempt in range(RETRIES):
                try:
                    return attr(*args, **kwargs)
                except Exception as err:  # MlflowException or SQLAlchemy OperationalError
                    if "locked" not in str(err).lower() or attempt == RETRIES - 1:
                        raise
                    time.sleep(0.05 * 2**attempt * (1 + random.random()))
            raise AssertionError("unreachable")

        return call


class Tracker:
    """One MLflow run: params, per-epoch metrics, images and files, ended with a status."""

    def __init__(self, *, root: Path, experiment: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
        self.root = root
        self.client = _RetryingClient(MlflowClient(tracking_uri=tracking_uri(root)))
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = (root / "artifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=location)
        self.run_id: str | None = None

    def find_runs(self, filter_string: str) -> list:
        """Runs of this experiment matching an MLflow filter, newest first."""
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"])

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    @contextlib.contextmanager
    def session(self, *, run_name: str = "", tags: dict[str, str] | None = None,
                reattach: str | None = None) -> Iterator[str]:
        """The lifecycle of one run: start it (or reattach to the run id `reattach`, which is
        RUNNING again), yield its id, and always end it: FINISHED when the block completes,
        KILLED on Ctrl-C or SIGTERM (Interrupted), FAILED otherwise, with the error as the
        run's `failure` tag."""
        if reattach is None:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                 tags=tags or {}).info.run_id
        else:
            self.client.update_run(reattach, status="RUNNING")
            self.run_id = reattach
        status = "FAILED"
        try:
            yield self.run_id
            status = "FINISHED"
        except (Interrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        except BaseException as err:
            with contextlib.suppress(Exception):  # the store's trouble must not hide the error
                self.set_tags({"failure": str(err) or type(err).__name__})
            raise
        finally:
            self._end(status)

    def resumable_run(self, config_hash: str) -> str | None:
        """The newest run of this experiment with this config, if it was interrupted (KILLED).

        A newer FINISHED run means there is nothing to resume; a RUNNING one may be alive in
        another process; a FAILED one diverged and would diverge again.
        """
        runs = self.find_runs(f"tags.config_hash = '{config_hash}'")
        return runs[0].info.run_id if runs and runs[0].info.status == "KILLED" else None

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
        # quiet: export notes on the example's batch size; the pickle caveat (in the README)
        logging.getLogger("torch._export").setLevel(logging.ERROR)
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        model.eval()
        with torch.inference_mode():
            output = model(torch.from_numpy(example)).float().numpy()
        signature = infer_signature(example, output)
        # start_run's exit marks the run FINISHED; the session sets the true status at its end
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", signature=signature, input_example=example,
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
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED (never left RUNNING)."""
        self.client.set_terminated(self.run_id, status=status)


def mlflow_version() -> str:
    return mlflow.__version__


def download_artifact(root: Path, run_id: str, artifact: str, *, missing: str) -> Path:
    """One artifact of a run, downloaded into a temporary folder; CitysegError if the run or
    the file is not there (`missing` says what is missing)."""
    _require_store(root)
    client = MlflowClient(tracking_uri=tracking_uri(root))
    try:
        client.get_run(run_id)
    except MlflowException:
        raise CitysegError(f"run {run_id!r} not found in {root / 'mlflow.db'}") from None
    try:
        folder = tempfile.mkdtemp(prefix="cityseg-")
        return Path(client.download_artifacts(run_id, artifact, folder))
    except (MlflowException, OSError):
        raise CitysegError(f"run {run_id} {missing}") from None


def fetch_config(root: Path, run_id: str) -> Path:
    """The resolved config.yaml that run `run_id` logged (a local copy)."""
    return download_artifact(root, run_id, "config.yaml", missing="has no config.yaml artifact")


def search_runs(root: Path, *, experiment: str | None, filter_string: str = "") -> list:
    """Runs in the store under `root`, of one MLflow experiment or of all (`cityseg compare`)."""
    _require_store(root)
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiments = client.search_experiments()
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment]
        if not experiments:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CitysegError(f"no MLflow experiment {experiment!r} in {root / 'mlflow.db'} "
                               f"(experiments: {names})")
    return client.search_runs([e.experiment_id for e in experiments], filter_string=filter_string)


def _require_store(root: Path) -> None:
    """Reading a store that is not there must not create an empty one."""
    if not (root / "mlflow.db").is_file():
        raise CitysegError(f"no MLflow store at {root / 'mlflow.db'}; train something first "
                           f"(make run), or point --runs at the folder holding mlflow.db")
