"""The training loop: one story from batch to checkpoint, on one process or many.

Everything per step stays on the device: the loss is summed into a device tensor, a
non-finite loss is noted on the device with its step, predictions go into device confusion
counts, and the host reads them at the end of the epoch (plus a cheap loss read for the
progress bar at most twice a second). With several processes (torchrun), those counters are
all-reduced once per epoch; before each batch the ranks agree, on the host, whether to stop,
checkpoint or fail, so all of them do it at the same step. What a checkpoint holds to continue
exactly, down to the batch: state.py.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cityseg import checkpoints
from cityseg.data.device_augment import DeviceAugmenter
from cityseg.data.loader import EpochSampler
from cityseg.errors import Interrupted
from cityseg.infer.predictor import Predictor
from cityseg.optim import Schedule, encoder_of
from cityseg.runtime import distributed
from cityseg.train import state as state_io
from cityseg.train.display import NullDisplay
from cityseg.train.health import EpochTally, diverged
from cityseg.train.recorder import NullRecorder
from cityseg.train.state import FitResult, StopFlag, TrainState

if TYPE_CHECKING:
    from cityseg.config import Experiment
    from cityseg.train.build import Components
    from cityseg.train.resume import ResumePoint

PROGRESS_REFRESH_S = 0.5


@dataclass(frozen=True)
class TrainerSettings:
    epochs: int
    grad_clip_norm: float
    accumulate: int
    boundary_tolerance_diagonal: float  # the BF score's tolerance, a fraction of the diagonal
    monitor: str
    mode: str  # max | min
    patience: int  # 0: no early stopping
    min_delta: float
    tracking_dir: Path  # checkpoints go to checkpoints.run_dir(tracking_dir, run_id)
    checkpoint_every_s: float = 0.0  # also write last.pt mid-epoch this often; 0: epoch ends only
    freeze_encoder_epochs: int = 0  # the model's encoder is fixed (batch norm in eval) this long


class Trainer:
    """Trains a segmentation model and keeps best and last checkpoints (rank 0 writes them)."""

    def __init__(self, *, predictor: Predictor, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, schedule: Schedule, train_loader: DataLoader,
                 sampler: EpochSampler, val_loader: DataLoader, settings: TrainerSettings,
                 config: dict, run_id: str, raw_model: nn.Module | None = None,
                 train_model: nn.Module | None = None, recorder: NullRecorder | None = None,
                 display=None, stop: StopFlag | None = None,
                 device_augment: DeviceAugmenter | None = None,
                 val_frames: list[str] | None = None) -> None:
        self.s = settings
        self.world = distributed.world()
        self.predictor = predictor  # validation and panels: never wrapped in DDP
        # what trains: the same model, maybe torch.compile'd and DistributedDataParallel
        self.model = train_model if train_model is not None else predictor.model
        self.train_predictor = predictor.with_model(self.model)
        # not torch.compile'd nor wrapped: its state_dict is plain
        self.raw_model = raw_model if raw_model is not None else predictor.model
        self.loss_fn = loss_fn.to(predictor.device)
        self.optimizer, self.schedule = optimizer, schedule
        self.scaler = torch.amp.GradScaler(predictor.device.type,
                                           enabled=predictor.amp_dtype == torch.float16)
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.config, self.run_id = config, run_id  # saved inside every checkpoint
        # rank 0's side effects (checkpoints, MLflow); a NullRecorder on the other ranks
        self.recorder = recorder or NullRecorder()
        # augmentations on the device: the loader delivers (frames, masks, their parameters)
        self.device_augment = device_augment
        self.display = display or NullDisplay()
        self.stop = stop or StopFlag()
        self.confusion: torch.Tensor | None = None  # of the last validation
        self.val_frames = val_frames  # the validation frames' names, in the dataset's order
        self.frames: tuple[list[str], np.ndarray] | None = None  # the last validation's counts
        self.paths = {which: checkpoints.path_of(settings.tracking_dir, run_id, which)
                      for which in ("last", "best")}

    @classmethod
    def for_run(cls, exp: Experiment, parts: Components, *, run_id: str,
                recorder: NullRecorder, display) -> Trainer:
        """The trainer of one run, its settings read from the experiment."""
        t = exp.trainer
        settings = TrainerSettings(
            epochs=t.epochs, grad_clip_norm=t.grad_clip_norm, accumulate=t.accumulate,
            boundary_tolerance_diagonal=t.boundary_tolerance_diagonal, monitor=exp.monitor,
            mode=exp.monitor_mode, patience=t.patience, min_delta=t.min_delta,
            tracking_dir=exp.tracking.dir, checkpoint_every_s=t.checkpoint_minutes * 60,
            freeze_encoder_epochs=exp.model.freeze_encoder_epochs)
        return cls(predictor=parts.predictor, raw_model=parts.model,
                   train_model=parts.train_model, loss_fn=parts.loss_fn,
                   optimizer=parts.optimizer, schedule=parts.schedule,
                   train_loader=parts.train_loader, sampler=parts.sampler,
                   val_loader=parts.val_loader, settings=settings,
                   config=exp.model_dump(mode="json"), run_id=run_id, recorder=recorder,
                   display=display, device_augment=parts.device_augment,
                   val_frames=parts.splits.frames.get("val"))

    def initial_state(self, point: ResumePoint | None) -> TrainState:
        """Every rank at once: a fresh state, or the resume point's weights, optimizer,
        scheduler, scaler and RNG states loaded and its position."""
        if point is None:
            return distributed.together(TrainState)
        return distributed.together(lambda: state_io.unpack(
            point.checkpoint, model=self.raw_model, optimizer=self.optimizer,
            schedule=self.schedule, scaler=self.scaler))

    # ------------------------------------------------------------------ pieces

    def _optimizer_step(self) -> None:
        if self.s.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step()

    def _checkpoint(self, state: TrainState, metrics: dict[str, float]) -> dict:
        return state_io.pack(state=state, metrics=metrics, config=self.config,
                                run_id=self.run_id, model=self.raw_model,
                                optimizer=self.optimizer, schedule=self.schedule,
                                scaler=self.scaler)

    def _save(self, checkpoint: dict, which: str) -> None:
        self.recorder.save(checkpoint, self.paths[which])

    def _next(self, batches) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
        """The next batch, or the error that reading it raised (agreed on by every rank)."""
        try:
            return next(batches), ""
        except StopIteration:
            raise
        except Exception as err:  # noqa: BLE001  (reported to every rank, then raised)
            if not self.world.distributed:
                raise
            return None, f"{type(err).__name__}: {err}"

    # ------------------------------------------------------------------ loops

    def _freeze_encoder(self, epoch: int) -> None:
        """During the first freeze_encoder_epochs epochs the encoder neither learns nor updates
        its batch-norm statistics (a function of the epoch: resuming keeps it)."""
        encoder = encoder_of(self.raw_model)
        if encoder is None or not self.s.freeze_encoder_epochs:
            return
        frozen = epoch <= self.s.freeze_encoder_epochs
        encoder.requires_grad_(not frozen)
        if frozen:
            encoder.eval()

    def train_epoch(self, state: TrainState) -> dict[str, float]:
        """Train the rest of epoch `state.epoch`: before each batch the ranks agree, then the
        step; the epoch's totals are summed over ranks once, at its end."""
        epoch, first_batch, world = state.epoch, state.step_in_epoch, self.world
        self.sampler.set_epoch(epoch, start_batch=first_batch)
        batches = self.sampler.batches
        self.model.train()
        self._freeze_encoder(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        # rank 0 carries what the checkpoint counted so far; the sums over ranks are global
        tally = EpochTally(state.loss_sum if world.is_main else 0.0, self.predictor.device)
        last_refresh, start, last_save = 0.0, time.perf_counter(), time.monotonic()
        self.display.epoch_start(epoch, self.s.epochs, batches, done=first_batch)
        loader = iter(self.train_loader)
        for batch in range(first_batch + 1, batches + 1):
            fetched, error = self._next(loader)
            if self._agree(state, batch, batches, error=error, tally=tally, last_save=last_save):
                last_save = time.monotonic()
            images, loss = self._train_step(fetched, batch, batches)
            tally.add(loss, batch, len(images))
            now, shown = time.perf_counter(), None
            if now - last_refresh > PROGRESS_REFRESH_S:  # a sync at most twice a second
                shown, tally.known_bad, last_refresh = loss.item(), tally.first_bad.item(), now
            img_per_s = tally.seen * world.size / max(now - start, 1e-9)  # as rank 0 sees
            self.display.step(len(images) * world.size, shown, img_per_s)
        return self._epoch_totals(state, tally, time.perf_counter() - start)

    def _agree(self, state: TrainState, batch: int, batches: int, *, error: str,
               tally: EpochTally, last_save: float) -> bool:
        """Before `batch`, every rank learns whether any must stop (a signal), checkpoint (the
        timer), or fail (a reading error, a non-finite loss), and all do it at this step.
        Returns whether a mid-epoch checkpoint was written."""
        epoch, first_batch, world = state.epoch, state.step_in_epoch, self.world
        done = batch - 1  # batches trained so far: a checkpoint position if a step ended
        # a position to stop at: after an optimizer step, with a checkpoint of it or before
        stoppable = done % self.s.accumulate == 0 and (done > 0 or epoch > 1)
        due = (self.s.checkpoint_every_s > 0 and done > first_batch and stoppable
               and time.monotonic() - last_save >= self.s.checkpoint_every_s)
        bad_slots = [0.0] * world.size
        bad_slots[world.rank] = tally.known_bad
        stop, due_any, failed, *bad = distributed.agree(
            [float(self.stop.signum), float(due), float(bool(error)), *bad_slots])
        if failed:
            distributed.raise_failures(error, doing="reading data")
        if any(bad):
            raise diverged(epoch, bad, last=self.paths["last"], world=self.world)
        saved = False
        if (stop or due_any) and stoppable and done > first_batch:
            # the position after the last step, exactly
            bad = distributed.all_reduce(tally.bad_slots(self.world), "sum").tolist()
            if any(bad):
                raise diverged(epoch, bad, last=self.paths["last"], world=self.world)
            loss_sum, seen = distributed.all_reduce(tally.sums(), "sum").tolist()
            here = dataclasses.replace(state, step_in_epoch=done, loss_sum=loss_sum,
                                       seen=state.seen + int(seen), world_size=world.size)
            self._save(self._checkpoint(here, {}), "last")
            saved = True
        if stop and stoppable:
            raise Interrupted(int(stop), self.run_id, checkpoints.position(epoch, done))
        return saved

    def _train_step(self, fetched: tuple, batch: int, batches: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, and the optimizer step at the end of an accumulation group;
        (images, the batch's detached loss)."""
        images, masks, *drawn = fetched
        if self.device_augment is not None:  # drawn: the batch's augmentation parameters
            device = self.predictor.device
            images, masks = self.device_augment(
                images.to(device, non_blocking=True), masks.to(device, non_blocking=True),
                drawn[0])
        x, y = self.train_predictor.inputs(images), self.train_predictor.targets(masks)
        loss = self.loss_fn(self.train_predictor.logits(x), y)
        group_start = (batch - 1) // self.s.accumulate * self.s.accumulate
        group_size = min(self.s.accumulate, batches - group_start)  # the last may be short
        self.scaler.scale(loss / group_size).backward()
        if batch % self.s.accumulate == 0 or batch == batches:
            self._optimizer_step()
        return images, loss.detach()

    def _epoch_totals(self, state: TrainState, tally: EpochTally, elapsed: float
                      ) -> dict[str, float]:
        """The epoch's train metrics, summed over ranks; divergence of loss or weights raises."""
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        # the epoch's one collective and one host copy
        totals = distributed.all_reduce(torch.cat([
            tally.sums(), (~finite).double().reshape(1), tally.bad_slots(self.world)]),
            "sum").tolist()
        loss_sum, seen_all, not_finite, bad = totals[0], totals[1], totals[2], totals[3:]
        if any(bad):
            raise diverged(state.epoch, bad, last=self.paths["last"], world=self.world)
        if not_finite:  # a finite loss but an overflowing update: never checkpoint such weights
            raise diverged(state.epoch, bad, last=self.paths["last"], world=self.world)
        return {"train/loss": loss_sum / max(state.seen + seen_all, 1),
                "throughput/img_s": seen_all / elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def validate(self) -> dict[str, float]:
        counts: list[np.ndarray] = []
        found, self.confusion = self.predictor.evaluate(
            self.val_loader, tolerance=self.s.boundary_tolerance_diagonal,
            loss_fn=self.loss_fn, frames=counts if self.val_frames is not None else None)
        if self.val_frames is not None:  # each rank scored its shard: its frames, gathered
            mine = [self.val_frames[i] for i in self.val_loader.sampler]
            shards = distributed.gather((mine, counts))
            names = [name for shard, _ in shards for name in shard]
            self.frames = names, np.stack([c for _, shard in shards for c in shard])
        return {f"val/{k}": v for k, v in found.items()}

    def _improved(self, score: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.s.mode == "min":
            return score < best - self.s.min_delta
        return score > best + self.s.min_delta

    def trained(self, state: TrainState) -> bool:
        """Whether training is over at `state`: every epoch done, or stopped early."""
        return state.stopped_early or state.epoch > self.s.epochs

    def fit(self, state: TrainState | None = None) -> FitResult:
        """Train from `state` (a fresh one, or one restored from a checkpoint) to the last epoch.
        A state whose training is over (a run resumed to finish its end) trains nothing: one
        validation gives the end its confusion matrix."""
        state = state or TrainState()
        try:
            if self.trained(state):
                self.validate()
            while not self.trained(state):
                self._fit_epoch(state)
        finally:
            self.display.close()
        return FitResult(state.history, state.best_epoch, state.best_score, self.paths,
                         state.stopped_early)

    def _fit_epoch(self, state: TrainState) -> None:
        """One epoch, its checkpoints and its record; then whether to stop early."""
        epoch = state.epoch
        metrics = {**self.train_epoch(state), **self.validate()}
        state.history.append(metrics)
        is_best = self._improved(metrics[self.s.monitor], state.best_score)
        if is_best:
            state.best_score, state.best_epoch = metrics[self.s.monitor], epoch
            state.bad_epochs = 0
        else:
            state.bad_epochs += 1
        self.schedule.after_epoch(metrics[self.s.monitor])
        state.epoch, state.step_in_epoch, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
        state.world_size = self.world.size
        patience_over = bool(self.s.patience) and state.bad_epochs >= self.s.patience
        state.stopped_early = patience_over  # saved: a resumed run then only finishes its end
        checkpoint = self._checkpoint(state, metrics)
        self._save(checkpoint, "last")
        if is_best:
            self._save(checkpoint, "best")
        self.display.epoch_end(epoch, metrics, is_best)
        halt = self.recorder.epoch_end(epoch, metrics, self.predictor,
                                       frames=self.frames if is_best else None)
        if patience_over:
            self.display.message(f"early stop: {self.s.monitor} has not improved for "
                                 f"{state.bad_epochs} epochs (best {state.best_score:.4f} "
                                 f"at epoch {state.best_epoch})")
            return
        # signalled during validation or logging, or stopped by the callback: every rank
        # stops here, or none
        stop, halt = distributed.agree([float(self.stop.signum), float(halt)])
        if self.trained(state):
            return
        if halt:
            state.stopped_early = True
            self._save(self._checkpoint(state, metrics), "last")  # its end is what remains
        elif stop:
            raise Interrupted(int(stop), self.run_id, state.position)
