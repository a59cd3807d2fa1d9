"""Where runs are tracked and how to reach them: URI precedence, the retrying client, and the
one `open` (a run-writing Tracker) and `open_store` (store-wide reads) used everywhere.

The store is always explicit: `sqlite:///<dir>/mlflow.db` with artifacts under
`<dir>/artifacts`, never MLflow's default of whatever the working directory holds. Reading a
store never creates one: a missing store is a NoStore naming where it was looked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cityseg.errors import CitysegError, StorageError
from cityseg.runtime.files import partial_path, sqlite_path, sqlite_uri, written_whole
from cityseg.tracking.outage import Outage, ServerSilent, unreachable

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # the UI's "Model training" experiments
# where `make ui` serves the store: 127.0.0.1, on the port `make ui PORT=...` exports
UI_PORT_ENV, UI_PORT = "CITYSEG_UI_PORT", 5000


class NoStore(CitysegError):
    """A read found no MLflow store (or no experiment) where it looked; nothing was created."""


def tracking_uri(root: Path, configured: str | None = None) -> str:
    """Where runs are tracked: MLFLOW_TRACKING_URI (set by --tracking-uri too), else the
    experiment's tracking.uri, else the local store `sqlite:///<tracking.dir>/mlflow.db`."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or configured
            or sqlite_uri((root / "mlflow.db").resolve()))


def is_local(uri: str) -> bool:
    """A SQLite file on this machine (the default), as opposed to a server or shared database."""
    return uri.startswith("sqlite:")


# ---------------------------------------------------------------- the retrying client

RETRIES = 10  # SQLite allows one writer at a time: parallel sweep children wait their turn
# what SQLite and the OS say when a store cannot be written, whatever the layer that reports it
_STORAGE_TROUBLE = ("disk is full", "disk i/o error", "readonly database", "read-only file system",
                    "no space left", "unable to open database", "permission denied")
# a store whose tables MLflow cannot read or migrate (half made by a creation that an older
# cityseg let a Ctrl-C interrupt, damaged, or not a store at all), in SQLite's and Alembic's words
_BROKEN = re.compile(r"(table|index) \S+ already exists|no such (table|column)|file is not a "
                     r"database|database disk image is malformed|can't locate revision")
_IDEMPOTENT = ("log_inputs", "set_tag", "set_experiment_tag")  # safe to repeat after a race
_JITTER = random.Random()  # its own generator: the global ones belong to the training


class RetryingClient:
    """MlflowClient whose calls retry with exponential backoff while SQLite says it is locked,
    and turn a full disk or an unwritable store into a StorageError naming the store. With a
    server (`outage`), a call that gets no answer is tried again until the server has been
    silent for the limit (TrackingUnavailable); `single()` is the same client trying once
    (ServerSilent), for writes that are kept instead of waited for."""

    def __init__(self, client: MlflowClient, store: str, outage: Outage | None = None,
                 *, patient: bool = True) -> None:
        self._client, self._store, self._outage, self._patient = client, store, outage, patient

    def single(self) -> RetryingClient:
        return RetryingClient(self._client, self._store, self._outage, patient=False)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.partial(self.retrying, attr, name.replace("_", " "))

    def retrying(self, call, what: str, *args, **kwargs):
        """`call(*args, **kwargs)` (`what` it does, for messages), retried as the class says."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                result = call(*args, **kwargs)
            except Exception as err:  # MlflowException, SQLAlchemy OperationalError, OSError
                self._storage_trouble(err, what)
                if self._outage is not None and unreachable(err):
                    self._outage.silent(started, err)
                    if not self._patient:
                        raise ServerSilent(str(err)) from None
                    self._outage.wait()
                    continue
                text = str(err).lower()
                # processes writing one row at once (sweep children logging one dataset,
                # workers tagging one experiment or parent run) race on its unique key: the
                # loser's retry finds the winner's row and updates it
                race = what.replace(" ", "_") in _IDEMPOTENT and "unique constraint" in text
                if ("locked" not in text and not race) or attempt == RETRIES - 1:
                    raise
                time.sleep(0.05 * 2**attempt * (1 + _JITTER.random()))
                attempt += 1
                continue
            if self._outage is not None:
                self._outage.answer()
            return result

    def _storage_trouble(self, err: Exception, what: str) -> None:
        _refuse_trouble(err, self._store, what)


def _refuse_trouble(err: Exception, store: str, what: str) -> None:
    """A StorageError naming the store and what to do, when `err` says its disk or its tables
    are the trouble (not a passing lock or a silent server)."""
    text = str(err).lower()
    reason = str(err).splitlines()[0][:200]
    if any(trouble in text for trouble in _STORAGE_TROUBLE):
        raise StorageError(f"MLflow store {store}: cannot {what}: {reason}") from None
    if _BROKEN.search(text):
        raise StorageError(
            f"MLflow store {store}: cannot {what}: it is not a whole MLflow store ({reason}).\n"
            f"  Its creation was probably interrupted (an older cityseg let Ctrl-C stop it "
            f"half-way). If it holds no runs you need, move it aside and run again, which "
            f"makes a new one:\n    mv {store} {store}.broken\n  Otherwise open it with the "
            f"MLflow that made it (`mlflow db upgrade {sqlite_uri(store)}`).") from None


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class Store:
    """One MLflow store: its URI, the folder it is rooted in, and a retrying client."""

    root: Path
    uri: str
    client: RetryingClient
    outage: Outage | None = None  # a server's silence, against tracking.outage_minutes

    @property
    def remote(self) -> bool:
        """Not a SQLite file here: other machines may resume, evaluate and predict from it."""
        return not is_local(self.uri)

    @property
    def name(self) -> str:
        """How messages name the store: the database file, or the server's URI."""
        return str(sqlite_path(self.uri)) if is_local(self.uri) else self.uri

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


def _connect(root: Path, uri: str | None, outage_minutes: float = 10.0) -> Store:
    resolved = tracking_uri(root, uri)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # nor download bars
    name = str(sqlite_path(resolved)) if is_local(resolved) else resolved
    if is_local(resolved):
        with _creating(Path(name)):
            if not Path(name).exists():
                _create(Path(name))
            try:
                client = MlflowClient(tracking_uri=resolved)
            except Exception as err:  # noqa: BLE001  (a broken store said as such, else raised)
                _refuse_trouble(err, name, "open it")
                raise
        return Store(root=root, uri=resolved, client=RetryingClient(client, store=name))
    # the client waits for a silent server itself, for tracking.outage_minutes, and keeps what
    # training logs meanwhile: MLflow's own retries (7, over four minutes, blocking the call and
    # drawing their jitter from the training's random generator) would hide the outage from it
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    outage = Outage(resolved, outage_minutes * 60)
    return Store(root=root, uri=resolved, outage=outage,
                 client=RetryingClient(MlflowClient(tracking_uri=resolved), name, outage))


@contextlib.contextmanager
def _creating(db: Path) -> Iterator[None]:
    """One process at a time opens the SQLite store `db` for the first time: MLflow creates
    its tables and migrates them, and two doing it at once fail ("table ... already exists").
    An exclusive lock on `<db>.lock` beside it; the others wait, then open the ready store."""
    try:
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a folder nobody can write holds a store nobody is creating
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _create(db: Path) -> None:
    """A new SQLite store, made whole beside its name and then moved there: MLflow's migrations
    take 15-30 s on a first run, and SIGINT, SIGTERM or kill -9 meanwhile leave no half-made
    store under the name (a leftover from a kill -9 is removed by the next creation)."""
    partial = partial_path(db)
    leftovers = [partial, *(Path(f"{partial}{s}") for s in ("-journal", "-wal", "-shm"))]
    for path in leftovers:  # the lock is held: nobody else is creating it
        path.unlink(missing_ok=True)
    try:
        with written_whole(db) as partial:
            client = MlflowClient(tracking_uri=sqlite_uri(partial))
            client.search_experiments()  # creates and migrates the tables
            with contextlib.suppress(AttributeError):  # its connections, before the move
                client._tracking_client.store.engine.dispose()
    finally:
        for path in leftovers[1:]:
            path.unlink(missing_ok=True)


def new_local_store(root: Path, uri: str | None = None) -> Path | None:
    """The SQLite file that opening the store under `root` (or at `uri`) would create; None
    when it exists or the store is a server."""
    resolved = tracking_uri(root, uri)
    path = sqlite_path(resolved)
    return path if is_local(resolved) and not path.exists() else None


def open_store(root: Path, uri: str | None = None, *, outage_minutes: float = 10.0) -> Store:
    """An existing store, for reads across experiments; NoStore if a local one is not there
    (reading must not create an empty one)."""
    resolved = tracking_uri(root, uri)
    path = sqlite_path(resolved)
    if is_local(resolved) and not path.is_file():
        raise NoStore(f"no MLflow store at {path}; train something first (make run), point "
                      f"--runs at the folder holding mlflow.db, or give --tracking-uri")
    return _connect(root, uri, outage_minutes)


def connect(root: Path, *, experiment: str, uri: str | None, create: bool,
            outage_minutes: float = 10.0) -> tuple[Store, str]:
    """The store and the id of `experiment` in it: created if `create` (the store's folder,
    the experiment with its artifacts beside a local store), else NoStore when missing."""
    if not create:
        store = open_store(root, uri, outage_minutes=outage_minutes)
        found = store.client.get_experiment_by_name(experiment)
        if found is None:
            raise NoStore(f"no MLflow experiment {experiment!r} in {store.name}")
        return store, found.experiment_id
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot create the tracking dir {root} (tracking.dir): "
                           f"{err.strerror or err}") from None
    store = _connect(root, uri, outage_minutes)
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


# ---------------------------------------------------------------- store-wide reads


def ui_port() -> int:
    """The port of the local UI: $CITYSEG_UI_PORT (`make ui PORT=N` and `make run` set it),
    else 5000."""
    text = os.environ.get(UI_PORT_ENV, str(UI_PORT))
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise CitysegError(f"{UI_PORT_ENV}={text}: give the port number the MLflow UI serves on")
    return int(text)


def run_url(experiment_id: str, run_id: str | None = None, *, uri: str = "",
            port: int | None = None) -> str:
    """The UI page of a run, or the experiment's training runs view (on the tracking server
    when `uri` is one, else where `make ui` serves the local store: 127.0.0.1 on `port`,
    by default `ui_port()`)."""
    base = (uri.rstrip("/") if uri.startswith(("http://", "https://"))
            else f"http://127.0.0.1:{port or ui_port()}")
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


def experiment_links(root: Path, *, uri: str | None = None,
                     port: int | None = None) -> list[tuple[str, str]]:
    """(name, training runs view) of every experiment in the store."""
    store = open_store(root, uri)
    return [(e.name, run_url(e.experiment_id, uri=store.uri, port=port))
            for e in store.client.search_experiments() if e.name != "Default"]
