"""Where runs are tracked and how to reach them: URI precedence, the retrying client, and the
one `open` (a run-writing Tracker) and `open_store` (store-wide reads) used everywhere.

The store is always explicit: `sqlite:///<dir>/mlflow.db` with artifacts under
`<dir>/artifacts`, never MLflow's default of whatever the working directory holds. Reading a
store never creates one: a missing store is a NoStore naming where it was looked for.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cityseg.errors import CitysegError, StorageError

if TYPE_CHECKING:
    from cityseg.tracking.session import Tracker

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # the UI's "Model training" experiments
UI = "http://127.0.0.1:5000"  # where `make ui` serves the store


class NoStore(CitysegError):
    """A read found no MLflow store (or no experiment) where it looked; nothing was created."""


def tracking_uri(root: Path, configured: str | None = None) -> str:
    """Where runs are tracked: MLFLOW_TRACKING_URI (set by --tracking-uri too), else the
    experiment's tracking.uri, else the local store `sqlite:///<tracking.dir>/mlflow.db`."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or configured
            or f"sqlite:///{(root / 'mlflow.db').resolve()}")


def is_local(uri: str) -> bool:
    """A SQLite file on this machine (the default), as opposed to a server or shared database."""
    return uri.startswith("sqlite:")


# ---------------------------------------------------------------- the retrying client

RETRIES = 10  # SQLite allows one writer at a time: parallel sweep children wait their turn
# what SQLite and the OS say when a store cannot be written, whatever the layer that reports it
_STORAGE_TROUBLE = ("disk is full", "disk i/o error", "readonly database", "read-only file system",
                    "no space left", "unable to open database", "permission denied")
_IDEMPOTENT = ("log_inputs", "set_tag", "set_experiment_tag")  # safe to repeat after a race


class RetryingClient:
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


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class Store:
    """One MLflow store: its URI, the folder it is rooted in, and a retrying client."""

    root: Path
    uri: str
    client: RetryingClient

    @property
    def remote(self) -> bool:
        """Not a SQLite file here: other machines may resume, evaluate and predict from it."""
        return not is_local(self.uri)

    @property
    def name(self) -> str:
        """How messages name the store: the database file, or the server's URI."""
        return self.uri.removeprefix("sqlite:///")

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def search_runs(self, *, experiment: str | None, filter_string: str = "") -> list:
        """Runs of one MLflow experiment (CitysegError listing the others if it is not there),
        or of all of them."""
        experiments = self.client.search_experiments()
        if experiment is not None:
            experiments = [e for e in experiments if e.name == experiment]
            if not experiments:
                names = ", ".join(e.name for e in self.client.search_experiments()) or "none"
                raise CitysegError(f"no MLflow experiment {experiment!r} in {self.name} "
                                   f"(experiments: {names})")
        return self.client.search_runs([e.experiment_id for e in experiments],
                                       filter_string=filter_string)


def _connect(root: Path, uri: str | None) -> Store:
    resolved = tracking_uri(root, uri)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
    name = resolved.removeprefix("sqlite:///")
    return Store(root=root, uri=resolved,
                 client=RetryingClient(MlflowClient(tracking_uri=resolved), store=name))


def open_store(root: Path, uri: str | None = None) -> Store:
    """An existing store, for reads across experiments; NoStore if a local one is not there
    (reading must not create an empty one)."""
    resolved = tracking_uri(root, uri)
    path = resolved.removeprefix("sqlite:///")
    if is_local(resolved) and not Path(path).is_file():
        raise NoStore(f"no MLflow store at {path}; train something first (make run), point "
                      f"--runs at the folder holding mlflow.db, or give --tracking-uri")
    return _connect(root, uri)


def connect(root: Path, *, experiment: str, uri: str | None, create: bool) -> tuple[Store, str]:
    """The store and the id of `experiment` in it: created if `create` (the store's folder,
    the experiment with its artifacts beside a local store), else NoStore when missing."""
    if not create:
        store = open_store(root, uri)
        found = store.client.get_experiment_by_name(experiment)
        if found is None:
            raise NoStore(f"no MLflow experiment {experiment!r} in {store.name}")
        return store, found.experiment_id
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot create the tracking dir {root} (tracking.dir): "
                           f"{err.strerror or err}") from None
    store = _connect(root, uri)
    return store, _created_experiment(store, experiment)


def _created_experiment(store: Store, experiment: str) -> str:
    """The id of `experiment`, created if needed, tagged so the UI opens it on its runs."""
    client = store.client
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:  # a local store keeps artifacts beside it; a server decides where its go
        location = (store.root / "artifacts").resolve().as_uri() if not store.remote else None
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except MlflowException:
            # created by another process a moment ago (sweep workers starting together)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    if found is None or EXPERIMENT_KIND_TAG not in found.tags:
        # the UI then opens the experiment on its training runs, not on a GenAI overview
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return experiment_id


def open(root: Path, *, experiment: str, uri: str | None = None, create: bool = True
         ) -> Tracker:
    """The one way to build a Tracker of `experiment` in the store under `root` (or at `uri`).
    create=False never creates a store or an experiment: NoStore instead."""
    # imported here: the Tracker is built on a Store, so session.py imports this module
    from cityseg.tracking.session import Tracker

    store, experiment_id = connect(root, experiment=experiment, uri=uri, create=create)
    return Tracker(store=store, experiment_id=experiment_id)


# ---------------------------------------------------------------- store-wide reads


def run_url(experiment_id: str, run_id: str | None = None, *, uri: str = "") -> str:
    """The UI page of a run, or the experiment's training runs view (on the tracking server
    when `uri` is one, else where `make ui` serves the local store)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI
    page = f"{base}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}" if run_id else page


def tag_filter(**tags: str) -> str:
    """The MLflow filter matching runs that carry every tag given (name = value)."""
    for key, value in tags.items():
        if "'" in value:
            raise ValueError(f"tag {key}: a quote cannot be searched for: {value!r}")
    return " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())


def search_runs(root: Path, *, experiment: str | None, filter_string: str = "",
                sweep_id: str | None = None, uri: str | None = None) -> list:
    """Runs in the store under `root`, of one MLflow experiment or of all (`cityseg compare`);
    only the children of sweep `sweep_id` if given."""
    if sweep_id is not None:
        children = tag_filter(sweep_id=sweep_id, sweep_role="child")
        filter_string = f"{filter_string} and {children}" if filter_string else children
    return open_store(root, uri).search_runs(experiment=experiment, filter_string=filter_string)


def experiment_links(root: Path, *, uri: str | None = None) -> list[tuple[str, str]]:
    """(name, training runs view) of every experiment in the store."""
    store = open_store(root, uri)
    return [(e.name, run_url(e.experiment_id, uri=store.uri))
            for e in store.client.search_experiments() if e.name != "Default"]
