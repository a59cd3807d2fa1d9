"""Which runs? The named tag queries (a sweep's children and parents, the runs of one point,
the resumable run), artifacts fetched from a run, and the model registry (model_run, promote).

Callers name the question; the MLflow filter strings are written here once.
"""

from __future__ import annotations

import contextlib
import functools
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException

from cityseg.errors import CitysegError
from cityseg.tracking.liveness import interrupted
from cityseg.tracking.store import Store, open_store, tag_filter

if TYPE_CHECKING:
    from cityseg.tracking.session import Tracker

# ---------------------------------------------------------------- named tag queries (newest first)


def sweep_children(tracker: Tracker, sweep_id: str) -> list:
    """Every child run of the sweep (a point may have several: retried, resumed elsewhere)."""
    return tracker.find_runs(tag_filter(sweep_id=sweep_id, sweep_role="child"))


def sweep_parents(tracker: Tracker, sweep_id: str) -> list:
    """The sweep's parent runs (workers starting at once may each have created one)."""
    return tracker.find_runs(tag_filter(sweep_id=sweep_id, sweep_role="parent"))


def point_runs(tracker: Tracker, sweep_id: str, point_hash: str) -> list:
    """The runs of one point of the sweep (its config hash), whatever their status."""
    return tracker.find_runs(tag_filter(sweep_id=sweep_id, sweep_point=point_hash))


def resumable_run(tracker: Tracker, *config_hashes: str) -> str | None:
    """The newest run of the tracker's experiment carrying any of these config hashes, if it
    was interrupted (KILLED) or crashed (RUNNING but stale, or marked crashed by `cityseg runs
    clean`).

    A newer FINISHED run means there is nothing to resume; a live RUNNING one belongs to
    another process; a FAILED one diverged and would diverge again.
    """
    runs = {r.info.run_id: r for h in dict.fromkeys(config_hashes)
            for r in tracker.find_runs(tag_filter(config_hash=h))}
    if not runs:
        return None
    newest = max(runs.values(), key=lambda r: (r.info.start_time, r.info.run_id))
    return newest.info.run_id if interrupted(newest) else None


def is_complete(run) -> bool:
    """A run that ended normally with its full schedule: FINISHED and not pruned."""
    return run.info.status == "FINISHED" and run.data.tags.get("pruned") != "true"


# ---------------------------------------------------------------- a run named by its id's start

_ID_PREFIX = re.compile(r"[0-9a-f]{1,31}")


def full_run_id(store: Store, given: str) -> str:
    """The id of the run `given` names: a whole id as it is, else the one run (of any
    experiment) whose id starts with it, as the 8-character ids tables print. CitysegError,
    listing the candidates, when no run or several runs start with it; text that is no id's
    start is returned as it is (the caller says what it is not)."""
    if not _ID_PREFIX.fullmatch(given):
        return given
    found = [r for r in store.search_runs(experiment=None) if r.info.run_id.startswith(given)]
    if len(found) == 1:
        return found[0].info.run_id
    if not found:
        raise CitysegError(f"run {given}: no run in {store.name} has an id starting with it")
    shown = "\n  ".join(f"{r.info.run_id}  {r.info.run_name}  ({r.info.status})"
                        for r in found[:10])
    more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
    raise CitysegError(f"run {given}: {len(found)} runs in {store.name} have ids starting with "
                       f"it; give more of the id:\n  {shown}{more}")


def run_id_in(root: Path, given: str, *, uri: str | None = None) -> str:
    """`full_run_id` in the store under `root` (or at `uri`)."""
    return full_run_id(open_store(root, uri), given)


# ---------------------------------------------------------------- artifacts


@contextlib.contextmanager
def downloaded(root: Path, run_id: str, artifact: str, *, missing: str,
               uri: str | None = None) -> Iterator[Path]:
    """One artifact of a run, as a local path inside a temporary folder that is removed when
    the block ends; CitysegError if the run or the file is not there (`missing` says what is
    missing, after "run RUN_ID")."""
    store = open_store(root, uri)
    with tempfile.TemporaryDirectory(prefix="cityseg-") as folder:
        yield _download(store, run_id, artifact, folder, missing=missing)


def run_artifacts(root: Path, run_id: str, *, uri: str | None = None
                  ) -> Callable[..., contextlib.AbstractContextManager[Path]]:
    """Run `run_id`'s artifacts in the store at `uri` (None: MLFLOW_TRACKING_URI, else the
    store under `root`), as `checkpoints.intact` and `restore` look for copies:
    `artifacts(artifact, missing=...)` is `downloaded` of that run."""
    return functools.partial(downloaded, root, run_id, uri=uri)


def logged_config(root: Path, run_id: str, *, uri: str | None = None
                  ) -> contextlib.AbstractContextManager[Path]:
    """The resolved config.yaml that run `run_id` logged, as `downloaded` gives it (a local
    path while the block lasts)."""
    return downloaded(root, run_id, "config.yaml", missing="has no config.yaml artifact", uri=uri)


def config_text(root: Path, run_id: str, *, uri: str | None = None) -> str:
    """The resolved config.yaml that run `run_id` logged, as text."""
    with logged_config(root, run_id, uri=uri) as path:
        return path.read_text()


def _download(store: Store, run_id: str, artifact: str, folder: str, *, missing: str) -> Path:
    if not store.run_exists(run_id):
        raise CitysegError(f"run {run_id!r} not found in {store.name}")
    try:
        return Path(store.client.download_artifacts(run_id, artifact, folder))
    except (MlflowException, OSError):
        raise CitysegError(f"run {run_id} {missing}") from None


# ---------------------------------------------------------------- the model registry


def model_run(root: Path, uri: str, *, store_uri: str | None = None) -> str:
    """The run that logged the registered model `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    store = open_store(root, store_uri)
    body = uri.removeprefix("models:/")
    name, at, alias = body.partition("@")
    if not uri.startswith("models:/") or not name or (not at and "/" not in body):
        raise CitysegError(f"--model {uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if at:
            version = store.client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.rpartition("/")
            version = store.client.get_model_version(name, number)
    except MlflowException as err:
        raise CitysegError(f"--model {uri}: not in the registry of {store.name} "
                           f"({str(err).splitlines()[0][:160]})") from None
    if not version.run_id:
        raise CitysegError(f"--model {uri}: version {version.version} has no source run")
    return version.run_id


def promote(root: Path, run_id: str, alias: str, *, uri: str | None = None) -> tuple[str, str]:
    """Point `alias` at the model version that run `run_id` registered; (name, version)."""
    client = open_store(root, uri).client
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        raise CitysegError(f"run {run_id} registered no model; set tracking.register_model: NAME "
                           f"in its experiment (or register it in the MLflow UI)")
    newest = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(newest.name, alias, newest.version)
    return newest.name, newest.version


# ---------------------------------------------------------------- files added to a run later


def add_artifact(root: Path, run_id: str, path: Path, folder: str, *,
                 uri: str | None = None) -> str:
    """Upload `path` into `folder` of the artifacts of run `run_id` (an ended run stays as it
    ended: `cityseg export --log`); the file's runs:/ URI."""
    store = open_store(root, uri)
    if not store.run_exists(run_id):
        raise CitysegError(f"run {run_id!r} not found in {store.name}")
    store.client.log_artifact(run_id, str(path), folder)
    return f"runs:/{run_id}/{folder}/{path.name}"
