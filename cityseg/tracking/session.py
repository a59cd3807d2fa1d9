"""One MLflow run from start to end: the Tracker's session (FINISHED, FAILED or KILLED, never
left RUNNING), its heartbeat and system metrics, and everything a run logs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from cityseg.errors import Interrupted, StorageError
from cityseg.tracking import model
from cityseg.tracking.liveness import HEARTBEAT_EVERY_S, HEARTBEAT_TAG
from cityseg.tracking.store import Store

_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI


class _Heartbeat:
    """Refreshes a run's heartbeat tag every `every` seconds from a daemon thread."""

    def __init__(self, beat, every: float) -> None:
        self._beat, self._every = beat, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cityseg-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            with contextlib.suppress(Exception):  # a missed beat is not worth a failed run
                self._beat()

    def __enter__(self) -> _Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Tracker:
    """Runs of one MLflow experiment: the session of the current one (params, per-epoch
    metrics, images and files, ended with a status) and the runs around it. Built by
    `tracking.open`."""

    def __init__(self, *, store: Store, experiment_id: str) -> None:
        self.store, self.experiment_id = store, experiment_id
        self.root, self.uri, self.remote = store.root, store.uri, store.remote
        self.run_id: str | None = None

    # -------------------------------------------------------------- runs of the experiment

    def find_runs(self, filter_string: str) -> list:
        """Runs of this experiment matching an MLflow filter, newest first (the named queries
        in tracking.queries write the filters)."""
        return self.store.client.search_runs([self.experiment_id], filter_string=filter_string,
                                             order_by=["attributes.start_time DESC"])

    def get_run(self, run_id: str):
        return self.store.client.get_run(run_id)

    def run_exists(self, run_id: str) -> bool:
        return self.store.run_exists(run_id)

    def create_run(self, *, run_name: str, tags: dict[str, str]) -> str:
        """A new RUNNING run of this experiment outside any session (a sweep's parent); MLflow's
        context tags (source, user, git commit) first, ours over them. Returns its id."""
        return self.store.client.create_run(self.experiment_id, run_name=run_name,
                                            tags=resolve_tags(tags)).info.run_id

    def delete_run(self, run_id: str) -> None:
        self.store.client.delete_run(run_id)

    def metric_history(self, run_id: str, key: str) -> list[float]:
        """The values run `run_id` logged for `key`, in step order."""
        history = self.store.client.get_metric_history(run_id, key)
        return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    def metric_steps(self, key: str) -> list[int]:
        """The steps at which the current run logged `key`."""
        return [m.step for m in self.store.client.get_metric_history(self.run_id, key)]

    # -------------------------------------------------------------- the session

    @contextlib.contextmanager
    def session(self, *, run_name: str = "", tags: dict[str, str] | None = None,
                reattach: str | None = None, system_metrics: bool = False,
                leave_running: Callable[[], bool] | None = None) -> Iterator[str]:
        """The lifecycle of one run: start it (or reattach to the run id `reattach`, which is
        RUNNING again), keep its heartbeat fresh, yield its id, and always end it: FINISHED
        when the block completes, KILLED on Ctrl-C or SIGTERM (Interrupted), FAILED otherwise,
        with the error as the run's `failure` tag. A block that completes while
        `leave_running()` is true leaves the run RUNNING: other processes still write it (the
        workers of a sweep), and the last one ends it."""
        if reattach is None:
            self.run_id = self.create_run(run_name=run_name, tags=tags or {})
        else:
            self.store.client.update_run(reattach, status="RUNNING")
            self.run_id = reattach
        status = "FAILED"
        try:
            with _Heartbeat(self.beat, HEARTBEAT_EVERY_S), \
                    self._system_metrics(system_metrics, resume=reattach is not None):
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
            if status == "FINISHED":
                if leave_running is None or not leave_running():
                    self._end(status)
            else:  # an unwritable store leaves the run RUNNING, stale: `cityseg runs clean`
                with contextlib.suppress(Exception):
                    self._end(status)

    @contextlib.contextmanager
    def _system_metrics(self, enabled: bool, *, resume: bool) -> Iterator[None]:
        """MLflow's system-metrics monitor (system/cpu_utilization_percentage, ...) while the
        block runs; a resumed run continues its steps."""
        if not enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def beat(self) -> None:
        """Refresh the heartbeat: this process, on this host, is writing the run now."""
        self.store.client.set_tag(self.run_id, HEARTBEAT_TAG, json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 1)}))

    def _end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED (never left RUNNING)."""
        self.store.client.set_terminated(self.run_id, status=status)

    # -------------------------------------------------------------- what the run logs

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.store.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.store.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.store.client.set_tag(self.run_id, key, value)

    def log_datasets(self, splits: list[tuple[str, dict]]) -> None:
        """Dataset inputs of the run: (context, {name, digest, source, schema, profile})."""
        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                       source=json.dumps({"uri": d["source"]}),
                                       schema=json.dumps(d["schema"]),
                                       profile=json.dumps(d["profile"])),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for context, d in splits]
        self.store.client.log_inputs(self.run_id, datasets=inputs)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table (column -> values) as a JSON artifact that the MLflow UI shows as a table."""
        with self._artifact(artifact_file):
            self.store.client.log_table(self.run_id, columns, artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        with self._artifact(artifact_file):
            self.store.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._artifact(artifact_file):
            self.store.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str) -> None:
        with self._artifact(f"{artifact_path}/{path.name}"):
            self.store.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, *, checkpoint: Path, example: np.ndarray, metrics: dict[str, float],
                  step: int, register: str | None) -> str:
        """Log the servable model (tracking/model.py), its metrics, and register it under
        `register` if asked; returns its model URI."""
        return model.log_model(self, checkpoint=checkpoint, example=example, metrics=metrics,
                               step=step, register=register)

    @contextlib.contextmanager
    def _artifact(self, name: str) -> Iterator[None]:
        """An artifact that cannot be written is a StorageError naming it."""
        try:
            yield
        except OSError as err:
            raise StorageError(f"cannot write artifact {name} of run {self.run_id} under "
                               f"{self.root / 'artifacts'}: {err.strerror or err}") from None
