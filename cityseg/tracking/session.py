"""One MLflow run from start to end: the Tracker's session (FINISHED, FAILED or KILLED, never
left RUNNING), its heartbeat and system metrics, and everything a run logs.

What a run logs is a record (records.py): a local store gets it at once; a server gets it
through the session's Outbox (outbox.py), which keeps it while the server is silent, so that
training goes on through an outage of up to tracking.outage_minutes (outage.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from mlflow.tracking.context.registry import resolve_tags

from cityseg.errors import Interrupted
from cityseg.tracking import records
from cityseg.tracking.liveness import HEARTBEAT_EVERY_S, HEARTBEAT_TAG, Heartbeat, mark_crashed
from cityseg.tracking.outage import (
    ServerSilent,
    TrackingUnavailable,
    clear_signal,
    pause,
    signal_name,
)
from cityseg.tracking.outbox import END_GRACE_S, Outbox, forget, unspooled
from cityseg.tracking.records import Record
from cityseg.tracking.store import Store, connect

NOTE_TAG = "mlflow.note.content"  # the run's description in the UI


class Tracker:
    """Runs of one MLflow experiment: the session of the current one (params, per-epoch
    metrics, images and files, ended with a status) and the runs around it. Built by
    `tracking.open`."""

    def __init__(self, *, store: Store, experiment_id: str) -> None:
        self.store, self.experiment_id = store, experiment_id
        self.root, self.uri, self.remote = store.root, store.uri, store.remote
        self.run_id: str | None = None
        self._outbox: Outbox | None = None  # a server's session: writes kept while it is silent

    # -------------------------------------------------------------- runs of the experiment

    def find_runs(self, filter_string: str) -> list:
        """Runs of this experiment matching an MLflow filter, newest first (the named queries
        in tracking.queries write the filters)."""
        self._settled()
        return self.store.client.search_runs([self.experiment_id], filter_string=filter_string,
                                             order_by=["attributes.start_time DESC"])

    def get_run(self, run_id: str):
        self._settled()
        return self.store.client.get_run(run_id)

    def run_exists(self, run_id: str) -> bool:
        self._settled()
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
        self._settled()
        history = self.store.client.get_metric_history(run_id, key)
        return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    def metric_steps(self, key: str) -> list[int]:
        """The steps at which the current run logged `key`."""
        self._settled()
        return [m.step for m in self.store.client.get_metric_history(self.run_id, key)]

    # -------------------------------------------------------------- the session

    @contextlib.contextmanager
    def session(self, *, run_name: str = "", tags: dict[str, str] | None = None,
                reattach: str | None = None, system_metrics: bool = False,
                leave_running: Callable[[], bool] | None = None) -> Iterator[str]:
        """The lifecycle of one run: start it (or reattach to the run id `reattach`, which is
        RUNNING again, and send first what an outage kept of it), keep its heartbeat fresh,
        yield its id, and always end it: FINISHED when the block completes, KILLED on Ctrl-C
        or SIGTERM (Interrupted), FAILED otherwise, with the error as the run's `failure` tag.
        A block that completes while `leave_running()` is true leaves the run RUNNING: other
        processes still write it (the workers of a sweep), and the last one ends it. A server
        that cannot be told the end within tracking.outage_minutes: TrackingUnavailable."""
        clear_signal()
        if reattach is None:
            self.run_id = self.create_run(run_name=run_name, tags=tags or {})
        else:
            self.store.client.update_run(reattach, status="RUNNING")
            self.run_id = reattach
            self._send_kept()
        self._outbox = self._new_outbox()
        status, stopped = "FAILED", None
        try:
            with Heartbeat(self.beat, HEARTBEAT_EVERY_S), \
                    self._system_metrics(system_metrics, resume=reattach is not None):
                yield self.run_id
            status = "FINISHED"
        except (Interrupted, KeyboardInterrupt) as err:
            status, stopped = "KILLED", err
            raise
        except BaseException as err:
            stopped = err
            with contextlib.suppress(Exception):  # the store's trouble must not hide the error
                self.set_tags({"failure": str(err) or type(err).__name__})
            raise
        finally:
            leave = status == "FINISHED" and leave_running is not None and leave_running()
            self._close(status, stopped, leave=leave)

    def _close(self, status: str, stopped: BaseException | None, *, leave: bool) -> None:
        """End the run as `status` (unless `leave`). A local store: an unwritable one leaves a
        failed run RUNNING, stale (`cityseg runs clean`). A server: what it was not sent goes
        first, waited for within the limit when the run finished; then the end."""
        outbox, self._outbox = self._outbox, None
        if outbox is None:
            if status == "FINISHED":
                if not leave:
                    self._end(status)
            else:
                with contextlib.suppress(Exception):
                    self._end(status)
            return
        sent = outbox.close(wait=status == "FINISHED")
        ended = leave or (sent and self._ended(status))
        if sent and ended and not outbox.gave_up:
            return
        if status == "FAILED" and not isinstance(stopped, TrackingUnavailable):
            self._keep(outbox)  # the run's own error is the one to tell
            return
        message = self._lost(status, stopped, outbox, ended=ended)
        outbox.put_kept(("tags", {"failure": message}))  # a resume keeps it as recovered_from
        self._keep(outbox)
        raise TrackingUnavailable(message) from None

    def _ended(self, status: str) -> bool:
        """Whether the server took the run's end: waited for within the limit when the run
        FINISHED, for END_GRACE_S at most when it was stopped or failed."""
        outage, once = self.store.outage, self.store.client.single()
        grace = time.monotonic() + END_GRACE_S
        while True:
            try:
                once.set_terminated(self.run_id, status=status)
                return True
            except ServerSilent:
                late = outage.left() <= 0 if status == "FINISHED" else time.monotonic() >= grace
                if late or not pause(outage.next_pause()):
                    return False

    def _lost(self, status: str, stopped: BaseException | None, outbox: Outbox, *,
              ended: bool) -> str:
        """What happened, where the checkpoint and the unsent records are, and what to do."""
        server = f"the MLflow tracking server at {self.uri} {outbox.outage.describe()}"
        signum = signal_name() if not outbox.gave_up else None
        if isinstance(stopped, Interrupted) and not outbox.gave_up:
            signum = signal_name() or f"signal {stopped.signum}"
        where = f" at {stopped.where}" if isinstance(stopped, Interrupted) else ""
        if status == "FINISHED":
            ended_wait = f"; {signal_name()} ended the wait for it" if signal_name() else ""
            what = f"run {self.run_id} finished training, but {server}{ended_wait}"
        elif signum:
            what = f"{signum} stopped run {self.run_id}{where}, and {server}"
        else:
            what = f"{server}: run {self.run_id} stopped{where}"
        last = self._kept_dir().parent / "last.pt"
        checkpoint = (f"Its checkpoint is {last}" if last.is_file()
                      else "It wrote no checkpoint yet")
        shown = (f"MLflow has it {status}" if ended
                 else "MLflow shows it RUNNING (CRASHED once its heartbeat is stale)")
        kept = outbox.kept + 1  # with the failure tag that says this
        return (f"{what}.\n  {checkpoint}; {shown}; {kept} record(s) it could not send are kept "
                f"in {self._kept_dir()}.\n  When the server answers again, the same `cityseg "
                f"run` command with `--resume {self.run_id}` sends them and finishes the run.")

    def _kept_dir(self) -> Path:
        """Beside the run's checkpoints (checkpoints.run_dir): what a server missed."""
        return self.root / "checkpoints" / self.run_id / "unsent"

    def _keep(self, outbox: Outbox) -> int:
        return outbox.spool(self._kept_dir())

    def _send_kept(self) -> None:
        """A resumed run first sends what an outage kept of it on disk, in order."""
        folder = self._kept_dir()
        for record in unspooled(folder):
            self._deliver(record, self.store.client)
        forget(folder)

    def _new_outbox(self) -> Outbox | None:
        if not self.remote:
            return None
        once = self.store.client.single()
        return Outbox(deliver=lambda record: self._deliver(record, once),
                      probe=lambda: self._beat_with(once), outage=self.store.outage)

    def _settled(self) -> None:
        """Reads come after every write before them: the kept ones are sent first."""
        if self._outbox is not None and not self._outbox.settle():
            raise self.store.outage.unavailable()

    @contextlib.contextmanager
    def _system_metrics(self, enabled: bool, *, resume: bool) -> Iterator[None]:
        """MLflow's system-metrics monitor (system/cpu_utilization_percentage, ...) while the
        block runs; a resumed run continues its steps."""
        if not enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # with a server, its complaints about an outage would repeat the session's own account
        logging.getLogger("mlflow.system_metrics").setLevel(
            logging.CRITICAL if self.remote else logging.WARNING)
        monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def together(self) -> contextlib.AbstractContextManager[None]:
        """Writes that belong together: with a server, kept as one even when its silence passes
        the limit among them (Outbox.together); a local store writes each at once."""
        return contextlib.nullcontext() if self._outbox is None else self._outbox.together()

    def beat(self) -> None:
        """Refresh the heartbeat: this process, on this host, is writing the run now (to a
        silent server: not at all, and never waiting)."""
        outbox = self._outbox
        if outbox is None:
            self._beat_with(self.store.client)
        else:
            outbox.beat(lambda: self._beat_with(self.store.client.single()))

    def _beat_with(self, client) -> None:
        client.set_tag(self.run_id, HEARTBEAT_TAG, json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 1)}))

    def _end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED (never left RUNNING)."""
        self.store.client.set_terminated(self.run_id, status=status)

    # -------------------------------------------------------------- what the run logs

    def log_params(self, params: dict[str, str]) -> None:
        self._write(("params", dict(params)))

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        self._write(("metrics", {k: float(v) for k, v in metrics.items()}, step,
                     int(time.time() * 1000)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write(("tags", dict(tags)))

    def delete_tag(self, key: str) -> None:
        self._write(("delete_tag", key))

    def mark_crashed(self, run_id: str) -> str | None:
        """Mark run `run_id` FAILED and crashed if its process is gone (liveness.mark_crashed);
        the reason, or None when it is not stale."""
        return mark_crashed(self.store.client, self.get_run(run_id))

    def log_datasets(self, splits: list[tuple[str, dict]]) -> None:
        """Dataset inputs of the run: (context, {name, digest, source, schema, profile})."""
        self._write(("datasets", [list(split) for split in splits]))

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table (column -> values) as a JSON artifact that the MLflow UI shows as a table."""
        self._write(("table", columns, artifact_file))

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self._write(("image", image, artifact_file))

    def log_step_image(self, image: np.ndarray, *, key: str, step: int) -> None:
        """Image `step` of the series `key`: the run's Model metrics tab shows it with a step
        slider, and the Chart view the same key across runs side by side."""
        self._write(("step_image", image, key, step, int(time.time() * 1000)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(("text", text, artifact_file))

    def log_file(self, path: Path, artifact_path: str) -> None:
        self._write(("file", str(path), artifact_path))

    def log_model(self, log: Callable[..., str], **kwargs) -> str:
        """Log the run's servable model through `log(tracker, **kwargs) -> model URI` (the
        pyfunc's, deploy/pyfunc.py: tracking does not know what a cityseg model is), after the
        run's earlier writes; a server is waited for within the limit."""
        self._settled()
        if not self.remote:
            return log(self, **kwargs)
        return self.store.client.retrying(log, "log the model", self, **kwargs)

    def _write(self, record: Record) -> None:
        """One write of the current run: at once (a local store), or through the outbox."""
        if self._outbox is None:
            self._deliver(record, self.store.client)
        else:
            self._outbox.put(record)

    def _deliver(self, record: Record, client) -> None:
        """Send `record` of the current run through `client` (retrying, or trying once)."""
        records.deliver(record, client, self.run_id, artifacts=self.root / "artifacts")


def open(root: Path, *, experiment: str, uri: str | None = None, create: bool = True,
         outage_minutes: float = 10.0) -> Tracker:
    """The one way to build a Tracker of `experiment` in the store under `root` (or at `uri`).
    create=False never creates a store or an experiment: NoStore instead. A server may stay
    silent for `outage_minutes` (tracking.outage_minutes) before its calls give up."""
    store, experiment_id = connect(root, experiment=experiment, uri=uri, create=create,
                                   outage_minutes=outage_minutes)
    return Tracker(store=store, experiment_id=experiment_id)
