"""MLflow tracking: the only module that imports mlflow.

The store is always explicit: `sqlite:///<dir>/mlflow.db` with artifacts under
`<dir>/artifacts`, never MLflow's default of whatever the working directory holds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from cityseg.errors import CitysegError, Interrupted, StorageError

_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def tracking_uri(root: Path, configured: str | None = None) -> str:
    """Where runs are tracked: MLFLOW_TRACKING_URI (set by --tracking-uri too), else the
    experiment's tracking.uri, else the local store `sqlite:///<tracking.dir>/mlflow.db`."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or configured
            or f"sqlite:///{(root / 'mlflow.db').resolve()}")


def is_local(uri: str) -> bool:
    """A SQLite file on this machine (the default), as opposed to a server or shared database."""
    return uri.startswith("sqlite:")


def _store(root: Path, configured: str | None = None) -> tuple[MlflowClient, str]:
    """A client of an existing store, and how to name it in messages: reading a local store
    that is not there must not create an empty one."""
    uri = tracking_uri(root, configured)
    if is_local(uri) and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise CitysegError(f"no MLflow store at {uri.removeprefix('sqlite:///')}; train something "
                           f"first (make run), point --runs at the folder holding mlflow.db, or "
                           f"give --tracking-uri")
    return MlflowClient(tracking_uri=uri), uri.removeprefix("sqlite:///")


RETRIES = 10  # SQLite allows one writer at a time: parallel sweep children wait their turn
# what SQLite and the OS say when a store cannot be written, whatever the layer that reports it
_STORAGE_TROUBLE = ("disk is full", "disk i/o error", "readonly database", "read-only file system",
                    "no space left", "unable to open database", "permission denied")


_IDEMPOTENT = ("log_inputs", "set_tag", "set_experiment_tag")  # safe to repeat after a race


class _RetryingClient:
    """MlflowClient whose calls retry with exponential backoff while SQLite says it is locked,
    and turn a full disk or an unwritable store into a StorageError naming the store."""

    def __init__(self, client: MlflowClient, store: str) -> None:
        self._client, self._store = client, store

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for attempt in range(RETRIES):
                try:
                    return attr(*args, **kwargs)
                except Exception as err:  # MlflowException, SQLAlchemy OperationalError, OSError
                    text = str(err).lower()
                    if any(trouble in text for trouble in _STORAGE_TROUBLE):
                        reason = str(err).splitlines()[0][:200]
                        raise StorageError(f"MLflow store {self._store}: cannot "
                                           f"{name.replace('_', ' ')}: {reason}") from None
                    # processes writing one row at once (sweep children logging one dataset,
                    # workers tagging one experiment or parent run) race on its unique key: the
                    # loser's retry finds the winner's row and updates it
                    race = name in _IDEMPOTENT and "unique constraint" in text
                    if ("locked" not in text and not race) or attempt == RETRIES - 1:
                        raise
                    time.sleep(0.05 * 2**attempt * (1 + random.random()))
            raise AssertionError("unreachable")

        return call


NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # the UI's "Model training" experiments
UI = "http://127.0.0.1:5000"  # where `make ui` serves the store


def run_url(experiment_id: str, run_id: str | None = None, *, uri: str = "") -> str:
    """The UI page of a run, or the experiment's training runs view (on the tracking server
    when `uri` is one, else where `make ui` serves the local store)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI
    page = f"{base}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}" if run_id else page


# ---------------------------------------------------------------- heartbeats

HEARTBEAT_TAG = "cityseg.heartbeat"  # {"host", "pid", "time"} of the process writing the run
HEARTBEAT_EVERY_S = 60.0
# a RUNNING run whose heartbeat is older than this is stale wherever it ran (on its own host,
# a dead pid says so at once)
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class Liveness:
    """Whether a RUNNING run's process is still there, and why we think so."""

    alive: bool
    reason: str  # "pid 123 on host h is gone", "heartbeat 40 s ago from pid 123 on host h", ...
    host: str | None
    pid: int | None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def liveness(run, *, now: float | None = None) -> Liveness | None:
    """Liveness of a RUNNING run from its heartbeat tag (None for runs that ended)."""
    if run.info.status != "RUNNING":
        return None
    now = time.time() if now is None else now
    try:
        beat = json.loads(run.data.tags[HEARTBEAT_TAG])
        host, pid, last = str(beat["host"]), int(beat["pid"]), float(beat["time"])
    except (KeyError, ValueError, TypeError):  # no heartbeat (yet, or an older cityseg)
        host, pid, last = None, None, run.info.start_time / 1000
    age = now - last
    where = f"pid {pid} on host {host}" if pid is not None else "no heartbeat"
    if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
        return Liveness(False, f"{where} is gone", host, pid)
    if age > STALE_AFTER_S:
        return Liveness(False, f"{where}: silent for {age / 60:.0f} minutes "
                               f"(stale after {STALE_AFTER_S / 60:.0f})", host, pid)
    return Liveness(True, f"heartbeat {age:.0f} s ago from {where}", host, pid)


def is_stale(run) -> bool:
    """RUNNING, but its process is gone: a crash (kill -9, OOM, power loss, lost node)."""
    state = liveness(run)
    return state is not None and not state.alive


def interrupted(run) -> bool:
    """Stopped before its end and worth continuing: KILLED (Ctrl-C, SIGTERM) or crashed (a
    stale RUNNING run, or one `cityseg runs clean` marked FAILED with a `crashed` tag)."""
    status = run.info.status
    return (status == "KILLED" or is_stale(run)
            or (status == "FAILED" and "crashed" in run.data.tags))


def shown_status(run) -> str:
    """The run's status as people should read it: a stale RUNNING run is CRASHED."""
    return "CRASHED" if is_stale(run) else run.info.status


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
    """One MLflow run: params, per-epoch metrics, images and files, ended with a status."""

    def __init__(self, *, root: Path, experiment: str, uri: str | None = None) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the tracking dir {root} (tracking.dir): "
                               f"{err.strerror or err}") from None
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
        self.root = root
        self.uri = tracking_uri(root, uri)
        self.remote = not is_local(self.uri)  # other machines may resume, evaluate, predict
        self.client = _RetryingClient(MlflowClient(tracking_uri=self.uri),
                                      store=self.uri.removeprefix("sqlite:///"))
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:  # a local store keeps artifacts beside it; a server decides where its go
            location = (root / "artifacts").resolve().as_uri() if not self.remote else None
            try:
                self.experiment_id = self.client.create_experiment(experiment,
                                                                   artifact_location=location)
            except MlflowException:
                # created by another process a moment ago (sweep workers starting together)
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id
        if found is None or EXPERIMENT_KIND_TAG not in found.tags:
            # the UI then opens the experiment on its training runs, not on a GenAI overview
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG,
                                           MODEL_DEVELOPMENT)
        self.run_id: str | None = None

    def find_runs(self, filter_string: str) -> list:
        """Runs of this experiment matching an MLflow filter, newest first."""
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"])

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

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
            # MLflow's own context first (source name and type, user, git commit), ours over it
            context = resolve_tags(tags or {})
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                 tags=context).info.run_id
        else:
            self.client.update_run(reattach, status="RUNNING")
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
        monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                       tracking_uri=self.client.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def beat(self) -> None:
        """Refresh the heartbeat: this process, on this host, is writing the run now."""
        self.client.set_tag(self.run_id, HEARTBEAT_TAG, json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 1)}))

    def resumable_run(self, config_hash: str) -> str | None:
        """The newest run of this experiment with this config, if it was interrupted (KILLED)
        or crashed (RUNNING but stale, or marked crashed by `cityseg runs clean`).

        A newer FINISHED run means there is nothing to resume; a live RUNNING one belongs to
        another process; a FAILED one diverged and would diverge again.
        """
        runs = self.find_runs(f"tags.config_hash = '{config_hash}'")
        return runs[0].info.run_id if runs and interrupted(runs[0]) else None

    def metric_steps(self, key: str) -> list[int]:
        """The steps at which the current run logged `key`."""
        return [m.step for m in self.client.get_metric_history(self.run_id, key)]

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log_model(self, *, checkpoint: Path, example: np.ndarray, metrics: dict[str, float],
                  step: int, register: str | None) -> str:
        """Log the servable model (cityseg/serving.py, models from code, with the slim
        `checkpoint` and the cityseg package as its code), its metrics (`metrics` at `step`),
        and register it under `register` if asked; returns its model URI."""
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        # images of any size in, masks of the same size out
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))
        package = Path(__file__).parent
        logging.getLogger("mlflow.models").setLevel(logging.ERROR)  # no pip resolution notes
        # start_run's exit marks the run FINISHED; the session sets the true status at its end
        # quiet: MLflow's advice to type-hint predict (the input is an image array that cityseg
        # checks itself); its warning filters are reset by MLflow, so the notes are dropped here
        with _fluent(self.uri), mlflow.start_run(run_id=self.run_id), \
                contextlib.redirect_stderr(io.StringIO()):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(package / "serving.py"),
                artifacts={"checkpoint": str(checkpoint)}, code_paths=[str(package)],
                signature=signature, input_example=example,
                pip_requirements=model_requirements())
        # the model's own metrics (MLflow 3 logged models; they are the run's too, so named
        # best/... and the per-epoch histories keep one value per epoch)
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, f"best/{key}", value, step=step,
                                   model_id=info.model_id)
        tags = {"model_uri": info.model_uri}
        if register:
            with _fluent(self.uri):  # the registry resolves the model's source through it
                version = mlflow.register_model(info.model_uri, register)
            tags["registered_model"] = f"models:/{register}/{version.version}"
        self.set_tags(tags)
        return info.model_uri

    def log_datasets(self, splits: list[tuple[str, dict]]) -> None:
        """Dataset inputs of the run: (context, {name, digest, source, schema, profile})."""
        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                       source=json.dumps({"uri": d["source"]}),
                                       schema=json.dumps(d["schema"]),
                                       profile=json.dumps(d["profile"])),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for context, d in splits]
        self.client.log_inputs(self.run_id, datasets=inputs)

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

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table (column -> values) as a JSON artifact that the MLflow UI shows as a table."""
        with self._artifact(artifact_file):
            self.client.log_table(self.run_id, columns, artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        with self._artifact(artifact_file):
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._artifact(artifact_file):
            self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str) -> None:
        with self._artifact(f"{artifact_path}/{path.name}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @contextlib.contextmanager
    def _artifact(self, name: str) -> Iterator[None]:
        """An artifact that cannot be written is a StorageError naming it."""
        try:
            yield
        except OSError as err:
            raise StorageError(f"cannot write artifact {name} of run {self.run_id} under "
                               f"{self.root / 'artifacts'}: {err.strerror or err}") from None

    def _end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED (never left RUNNING)."""
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def _fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for a block. mlflow.set_tracking_uri also sets
    MLFLOW_TRACKING_URI, which cityseg reads first: it is put back as it was afterwards."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def mlflow_version() -> str:
    return mlflow.__version__


def model_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was trained with."""
    from importlib.metadata import version

    packages = ("torch", "torchvision", "numpy", "pillow", "pydantic", "pyyaml", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def download_artifact(root: Path, run_id: str, artifact: str, *, missing: str) -> Path:
    """One artifact of a run, downloaded into a temporary folder; CitysegError if the run or
    the file is not there (`missing` says what is missing)."""
    client, store = _store(root)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise CitysegError(f"run {run_id!r} not found in {store}") from None
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
    client, store = _store(root)
    experiments = client.search_experiments()
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment]
        if not experiments:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CitysegError(f"no MLflow experiment {experiment!r} in {store} "
                               f"(experiments: {names})")
    return client.search_runs([e.experiment_id for e in experiments], filter_string=filter_string)


def model_run(root: Path, uri: str) -> str:
    """The run that logged the registered model `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    client, store = _store(root)
    body = uri.removeprefix("models:/")
    name, at, alias = body.partition("@")
    if not uri.startswith("models:/") or not name or (not at and "/" not in body):
        raise CitysegError(f"--model {uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if at:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as err:
        raise CitysegError(f"--model {uri}: not in the registry of {store} "
                           f"({str(err).splitlines()[0][:160]})") from None
    if not version.run_id:
        raise CitysegError(f"--model {uri}: version {version.version} has no source run")
    return version.run_id


def promote(root: Path, run_id: str, alias: str) -> tuple[str, str]:
    """Point `alias` at the model version that run `run_id` registered; (name, version)."""
    client, _ = _store(root)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        raise CitysegError(f"run {run_id} registered no model; set tracking.register_model: NAME "
                           f"in its experiment (or register it in the MLflow UI)")
    newest = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(newest.name, alias, newest.version)
    return newest.name, newest.version


def experiment_links(root: Path) -> list[tuple[str, str]]:
    """(name, training runs view) of every experiment in the store."""
    client, _ = _store(root)
    uri = tracking_uri(root)
    return [(e.name, run_url(e.experiment_id, uri=uri)) for e in client.search_experiments()
            if e.name != "Default"]


def clean_stale(root: Path, *, experiment: str | None, dry_run: bool = False
                ) -> list[tuple[object, str]]:
    """Mark every stale RUNNING run (its process is gone) FAILED with a `crashed` tag saying
    why; live runs are never touched. Returns (run, reason) of each stale run."""
    found = []
    plain, store = _store(root)
    client = _RetryingClient(plain, store=store)
    for run in search_runs(root, experiment=experiment,
                           filter_string="attributes.status = 'RUNNING'"):
        state = liveness(run)
        if state is None or state.alive:
            continue
        if not dry_run:
            client.set_tag(run.info.run_id, "crashed", state.reason)
            client.set_terminated(run.info.run_id, status="FAILED")
        found.append((run, state.reason))
    return found
