"""Every side effect of a run, in one object: its MLflow run, per-epoch logging, checkpoints,
panels and its end.

Rank 0 records with a `Recorder`; every other rank gets a `NullRecorder` with the same methods
doing nothing (as the display does), so the runner and the trainer never ask which rank they
are on. A Recorder is a context manager: once `open` has started (or reattached to) the MLflow
run, leaving the block ends it FINISHED, FAILED or KILLED whatever happened, after uploading the
checkpoints that were saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cityseg import checkpoints, tracking, viz
from cityseg.config import Experiment, config_hash, run_params, to_yaml
from cityseg.data.cityscapes import class_frequencies, foreground_stats
from cityseg.deploy import pyfunc
from cityseg.errors import Interrupted, StorageError
from cityseg.infer.evaluation import log_confusion
from cityseg.infer.predictor import Predictor
from cityseg.metrics import PER_FRAME, write_frame_counts
from cityseg.optim import describe_groups
from cityseg.runtime import distributed
from cityseg.runtime.device import device_name
from cityseg.runtime.process import pid_alive
from cityseg.train.build import Components, augment_on
from cityseg.train.provenance import run_tags
from cityseg.train.resume import ResumePoint

# after each epoch (rank 0): tags to stop the run with, FINISHED, or None to go on
EpochHook = Callable[[int, dict[str, float]], "dict[str, str] | None"]
SAMPLE_KEY = "val/sample_"  # + the sample's index: the image series of one validation frame


class NullRecorder:
    """Records nothing: ranks other than 0, and library use without tracking."""

    url = ""

    def __enter__(self) -> NullRecorder:
        return self

    def __exit__(self, *exc) -> None: ...

    def open(self, point, parts, *, world, device: torch.device) -> str:
        """Every rank at once: the run's id, which rank 0 gets by starting its MLflow run (or
        reattaching to the checkpoint's), with every rank's device among its tags."""
        devices = distributed.gather(device_name(device))
        return distributed.broadcast(distributed.together(
            lambda: self._open(point, parts, devices=devices, world=world)))

    def _open(self, point, parts, *, devices: list[str], world) -> str | None: ...
    def start(self, state, parts) -> None: ...
    def save(self, checkpoint: dict, path: Path) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float], predictor, *,
                  frames: tuple[list[str], np.ndarray] | None = None) -> bool:
        return False
    def finish(self, result, confusion, stop) -> None: ...


class Recorder(NullRecorder):
    """Rank 0's record of one run in MLflow and on disk."""

    def __init__(self, exp: Experiment, *, tracker: tracking.Tracker | None, display,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 epoch_hook: EpochHook | None = None, params: tuple[str, ...] = ()) -> None:
        self.exp, self.display, self.epoch_hook = exp, display, epoch_hook
        self.params = params  # config keys logged as params beside RUN_PARAMS
        self.run_name, self.extra_tags = run_name or exp.name, tags or {}
        self.tracker = tracker  # opened with the run when resuming did not open it
        self.uploaded: dict[str, int] = {}  # checkpoint -> mtime already uploaded
        self.run_id: str | None = None
        self.samples: tuple[torch.Tensor, torch.Tensor] | None = None
        self.latest_cards: list[np.ndarray] = []  # the samples' images of the last epoch here
        self.point: ResumePoint | None = None  # what the run continues from
        self._session = contextlib.ExitStack()

    # ---------------------------------------------------------------- the run's lifetime

    def _open(self, point: ResumePoint | None, parts: Components, *, devices: list[str],
              world) -> str:
        """Start the MLflow run, or reattach to the one the checkpoint belongs to."""
        t = self.exp.tracking
        if self.tracker is None:
            if (new := tracking.new_local_store(t.dir, t.uri)) is not None:
                self.display.message(f"tracking: creating the MLflow store {new} (its first use "
                                     f"takes 15-30 s)")
            self.tracker = tracking.open(t.dir, experiment=t.experiment, uri=t.uri,
                                         outage_minutes=t.outage_minutes)
        self.upload = self.tracker.remote if t.upload_checkpoints == "auto" \
            else t.upload_checkpoints
        self.point = point
        tags = self._new_run_tags(parts, world, devices) if point is None else None
        self.run_id = self._session.enter_context(self.tracker.session(
            run_name=self.run_name, tags=tags, reattach=point.run_id if point else None,
            system_metrics=t.system_metrics))
        self.samples = parts.splits.val.spread(self.exp.tracking.num_samples)
        # what the model's metrics are scored on: the validation dataset input
        self.scored_on = (_dataset_name(self.exp, parts, "val"), parts.splits.fingerprints["val"])
        return self.run_id

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None and self.run_id is not None:
            with contextlib.suppress(Exception):  # keep what was saved; never hide the error
                self._upload_checkpoints()
        self._session.__exit__(kind, error, tb)

    @property
    def url(self) -> str:
        return tracking.run_url(self.tracker.experiment_id, self.run_id, uri=self.tracker.uri)

    # ---------------------------------------------------------------- start

    def start(self, state, parts: Components) -> None:
        """A new run: params, config, datasets and class frequencies. A resumed one: where it
        went on, and the epochs its checkpoint finished but a crash kept out of MLflow (a kill
        between saving the checkpoint and logging the epoch's metrics)."""
        exp, tracker, point = self.exp, self.tracker, self.point
        if point is not None:
            crash = {"resumed_after_crash": point.crash} if point.crash else {}
            # where the checkpoint stood: the numbers the stop was told with
            at = (state.position if state.epoch <= exp.trainer.epochs and not state.stopped_early
                  else "the run's end (its epochs were done)")
            # the epochs it trains now (a resume may change them): its tag and config.yaml
            tracker.set_tags({"resumed_at": at, "trainer.epochs": str(exp.trainer.epochs),
                              **crash})
            tracker.log_text(to_yaml(exp), "config.yaml")
            failure = tracker.get_run(self.run_id).data.tags.get("failure")
            if failure is not None:  # this run goes on: the failure is history, not its state
                tracker.set_tags({"recovered_from": failure})
                tracker.delete_tag("failure")
            logged = set(tracker.metric_steps(exp.monitor))
            for epoch, metrics in enumerate(state.history, start=1):
                if epoch not in logged:
                    tracker.log_metrics(metrics, step=epoch)
            return
        # a few params (MLflow heads each image card with them all); the whole config is
        # config.yaml, the optimizer's groups optimizer_groups.json
        tracker.log_params({**run_params(exp, self.params), **parts.loss_logged})
        tracker.log_datasets(_datasets(exp, parts))
        tracker.log_text(to_yaml(exp), "config.yaml")
        groups = describe_groups(parts.optimizer)
        tracker.log_text(json.dumps(groups, indent=2), "optimizer_groups.json")
        frequencies = {"split": "train", "resized_to": list(exp.data.frame_size),
                       **class_frequencies(parts.splits.train_class_counts())}
        tracker.log_text(json.dumps(frequencies, indent=2), "data/class_frequencies.json")

    def _new_run_tags(self, parts: Components, world, devices: list[str]) -> dict[str, str]:
        exp, predictor = self.exp, parts.predictor
        fraction, _ = foreground_stats(parts.splits.train_class_counts(), exp.data.foreground)
        return {**run_tags(predictor.device, predictor.amp_dtype),
                "data.layout": parts.splits.index.layout,
                "data.mask_encoding": parts.splits.index.encoding.kind,
                "data.foreground_fraction": f"{fraction:.5f}",
                "world_size": str(world.size), "backend": world.backend,
                "data.workers": str(exp.data.workers),  # data.num_workers as this run has it
                "augment_on": augment_on(exp, predictor.device),
                "inference": exp.trainer.inference.describe(),
                "devices": "; ".join(f"rank {r}: {d}" for r, d in enumerate(devices)),
                "config_hash": config_hash(exp), "trainer.epochs": str(exp.trainer.epochs),
                **({tracking.NOTE_TAG: exp.description} if exp.description else {}),
                **self.extra_tags}

    # ---------------------------------------------------------------- each epoch

    def save(self, checkpoint: dict, path: Path) -> None:
        """Write a checkpoint atomically (rank 0 alone writes them)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.save_atomic(checkpoint, path)

    def epoch_end(self, epoch: int, metrics: dict[str, float], predictor: Predictor, *,
                  frames: tuple[list[str], np.ndarray] | None = None) -> bool:
        """Log the epoch (metrics, the fixed samples' images and panel, new checkpoints, and
        for a new best epoch each validation frame's counts); True when the epoch hook stops
        the run here (a pruned sweep trial)."""
        tracker = self.tracker
        tracker.beat()
        with tracker.together():  # a resume after this epoch finds all of its records
            tracker.log_metrics(metrics, step=epoch)
            self._log_samples(predictor, step=epoch)
            if frames is not None:
                self._log_frames(epoch, *frames)
            if self.upload:  # another machine can go on from here
                self._upload_checkpoints(changed_only=True)
        stop_tags = self.epoch_hook(epoch, metrics) if self.epoch_hook is not None else None
        if stop_tags:
            tracker.set_tags(stop_tags)
            self.display.message(f"stopped after epoch {epoch}: "
                                 + ", ".join(f"{k}={v}" for k, v in stop_tags.items()))
        return bool(stop_tags)

    def _log_samples(self, predictor: Predictor, *, step: int) -> None:
        """The fixed validation samples as predicted after epoch `step`: one step-indexed image
        per sample (`val/sample_<i>`, the same keys in every run, so the Chart view compares a
        frame across runs), and the full-size panel of them all (samples/epoch_NNN.png)."""
        if self.samples is None:
            return
        images, masks = (t.numpy() for t in self.samples)
        predicted = predictor.predict(self.samples[0]).cpu().numpy()
        task = self.exp.task
        self.latest_cards = [viz.sample_card(image, mask, pred, task=task)
                             for image, mask, pred in zip(images, masks, predicted, strict=True)]
        for i, card in enumerate(self.latest_cards):
            self.tracker.log_step_image(card, key=f"{SAMPLE_KEY}{i}", step=step)
        self.tracker.log_image(viz.sample_panel(images, masks, predicted, task=task),
                               f"samples/epoch_{step:03d}.png")

    def _log_frames(self, epoch: int, names: list[str], counts: np.ndarray) -> None:
        """The best epoch's per-frame counts: kept beside the checkpoints, logged as
        eval/per_frame.npz (replaced when a later epoch is better)."""
        path = checkpoints.run_dir(self.exp.tracking.dir, self.run_id) / Path(PER_FRAME).name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_frame_counts(path, frames=names, counts=counts,
                           class_names=self.exp.task.class_names, epoch=epoch)
        self.tracker.log_file(path, str(Path(PER_FRAME).parent))

    def _upload_checkpoints(self, *, changed_only: bool = False) -> None:
        """The run's checkpoints as artifacts, so any machine with the store can use them."""
        for path in checkpoints.run_dir(self.exp.tracking.dir, self.run_id).glob("*.pt"):
            mtime = path.stat().st_mtime_ns
            if changed_only and self.uploaded.get(path.name) == mtime:
                continue
            self.tracker.log_file(path, "checkpoints")
            self.uploaded[path.name] = mtime

    # ---------------------------------------------------------------- the end

    def finish(self, result, confusion: torch.Tensor | None, stop) -> None:
        """The run's end, after its last epoch: checkpoints, learning curves, confusion report
        and the best model. A stage of its own: the run is tagged `cityseg.stage: end` while
        it runs, so a run whose end failed or was stopped resumes to redo it (each step is
        idempotent, and the model is logged once). A signal (`stop`, the trainer's flag) stops
        it between steps; a full disk is a StorageError."""
        exp, tracker = self.exp, self.tracker
        tracker.set_tags({tracking.STAGE_TAG: "end"})
        with self._end_step(stop):
            self._upload_checkpoints()
        with self._end_step(stop):
            tracker.set_tags({"best_epoch": str(result.best_epoch),
                              "stopped_early": str(result.stopped_early).lower()})
            tracker.log_image(viz.learning_curves(result.history, exp.monitor),
                              "learning_curves.png")
            # the last epoch's sample images again at step 0, where MLflow's image cards open
            # (it has no setting for that): a finished run shows its final prediction first
            for i, card in enumerate(self.latest_cards):
                tracker.log_step_image(card, key=f"{SAMPLE_KEY}{i}", step=0)
        if confusion is not None:
            with self._end_step(stop):
                log_confusion(tracker, self.exp.task, confusion)
        if exp.tracking.log_model:
            with self._end_step(stop):
                self._log_model(result.checkpoints["best"])
        with self._end_step(stop):  # a signal during the last step stops the run too
            tracker.set_tags({tracking.STAGE_TAG: "done"})

    @contextlib.contextmanager
    def _end_step(self, stop) -> Iterator[None]:
        """One step of the run's end: not begun after a signal; a full disk under MLflow's own
        writers (which raise OSError) said as a StorageError with the way to finish."""
        if stop.signum:
            raise Interrupted(stop.signum, self.run_id, "the run's end (its epochs are done)")
        try:
            yield
        except OSError as err:
            raise StorageError(f"the end of run {self.run_id} (uploads, reports, model) could "
                               f"not be written: {err.strerror or err}; free space, then "
                               f"`--resume {self.run_id}` finishes it") from None

    def _log_model(self, best_path: Path) -> None:
        """The best checkpoint's weights and config as a servable MLflow model (once: a run
        whose end is redone keeps the model it logged)."""
        if "model_uri" in self.tracker.get_run(self.run_id).data.tags:
            return
        best = checkpoints.load(best_path)
        _remove_dead_folders(MODEL_FOLDER)
        with tempfile.TemporaryDirectory(prefix=f"{MODEL_FOLDER}{os.getpid()}-") as folder:
            slim = Path(folder) / "checkpoint.pt"  # weights and config: what inference needs
            checkpoints.save_atomic({k: best[k] for k in ("format", "epoch", "metrics", "config",
                                                          "run_id", "state", "model")}, slim)
            height, width = self.exp.data.image_size
            example = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), np.uint8)
            validation = {k: v for k, v in best["metrics"].items() if k.startswith("val/")}
            self.tracker.log_model(pyfunc.log_model, name=model_name(self.run_name, self.exp),
                                   checkpoint=slim, example=example, metrics=validation,
                                   step=best["epoch"], dataset=self.scored_on,
                                   register=self.exp.tracking.register_model)


MODEL_FOLDER = "cityseg-model-"  # + pid: the temporary folder of a model being logged


def _remove_dead_folders(prefix: str) -> None:
    """Temporary folders `<prefix><pid>-...` whose process is gone (a kill -9 left them)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = folder.name.removeprefix(prefix).partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def model_name(run_name: str, exp: Experiment) -> str:
    """The logged model's name in the Models tab: the run's name and the network
    (`quickstart-unet`, `fg_weight-pos_weight_4-unet`), in the letters MLflow allows (no
    `/ : . % " '`)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{run_name}-{exp.model.name}").strip("_")


def _dataset_name(exp: Experiment, parts: Components, split: str) -> str:
    return f"{exp.data.name}-{parts.splits.index.layout}-{exp.data.task}-{split}"


def _datasets(exp: Experiment, parts: Components) -> list[tuple[str, dict]]:
    """The training and validation splits as MLflow dataset inputs: (context, description);
    the digest is the split's fingerprint (files, sizes, mtimes, layout, target size)."""
    splits, found = parts.splits, []
    for context, split, dataset in (("training", "train", splits.train),
                                    ("validation", "val", splits.val)):
        fraction, _ = foreground_stats(dataset.reader.class_counts(), exp.data.foreground)
        height, width = exp.data.frame_size
        found.append((context, {
            "name": _dataset_name(exp, parts, split),
            "digest": splits.fingerprints[split], "source": str(Path(exp.data.root).resolve()),
            "schema": {"image": {"dtype": "uint8", "shape": [height, width, 3]},
                       "mask": {"dtype": "uint8", "shape": [height, width],
                                "classes": list(exp.task.class_names)}},
            "profile": {"images": len(dataset), "image_size": [height, width],
                        "foreground_fraction": round(fraction, 5)}}))
    return found
