"""The training loop: one story from batch to checkpoint.

Everything per step stays on the device: the loss is summed into a device tensor, a
non-finite loss is noted on the device with its step, predictions go into device confusion
counts, and the host reads them at the end of the epoch (plus a cheap loss read for the
progress bar at most twice a second). A checkpoint holds everything needed to continue
exactly: weights, optimizer, scheduler, gradient scaler, RNG states and the loop's position,
down to the batch when a signal stopped it mid-epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cityseg.data.datasets import EpochSampler
from cityseg.engine import checkpoints
from cityseg.engine.display import NullDisplay
from cityseg.engine.predictor import Predictor
from cityseg.errors import Interrupted, TrainingDiverged
from cityseg.optim import Schedule

PROGRESS_REFRESH_S = 0.5


@dataclass(frozen=True)
class TrainerSettings:
    epochs: int
    grad_clip_norm: float
    accumulate: int
    boundary_tolerance: int
    monitor: str
    mode: str  # max | min
    patience: int  # 0: no early stopping
    min_delta: float
    tracking_dir: Path  # checkpoints go to checkpoints.run_dir(tracking_dir, run_id)
    checkpoint_every_s: float = 0.0  # also write last.pt mid-epoch this often; 0: epoch ends only


@dataclass
class TrainState:
    """The loop's position and memory; saved in every checkpoint."""

    epoch: int = 1  # the epoch in progress, or the next one to run
    step_in_epoch: int = 0  # batches of `epoch` already trained (a run stopped mid-epoch)
    loss_sum: float = 0.0  # of those batches, for the epoch's mean train loss
    seen: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement, for early stopping
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]
    stopped_early: bool


class StopFlag:
    """Set by a signal handler; the trainer stops at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.signum = 0


EpochCallback = Callable[[int, dict[str, float], tuple | None], None]


class Trainer:
    """Trains a segmentation model and keeps best and last checkpoints."""

    def __init__(self, *, predictor: Predictor, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, schedule: Schedule, train_loader: DataLoader,
                 sampler: EpochSampler, val_loader: DataLoader, settings: TrainerSettings,
                 config: dict, run_id: str, raw_model: nn.Module | None = None,
                 samples: tuple[torch.Tensor, torch.Tensor] | None = None,
                 on_epoch_end: EpochCallback | None = None, display=None,
                 stop: StopFlag | None = None) -> None:
        self.s = settings
        self.predictor = predictor
        self.model = predictor.model  # trained in place (maybe torch.compile'd)
        # not torch.compile'd: its state_dict is plain
        self.raw_model = raw_model if raw_model is not None else self.model
        self.loss_fn = loss_fn.to(predictor.device)
        self.optimizer, self.schedule = optimizer, schedule
        self.scaler = torch.amp.GradScaler(predictor.device.type,
                                           enabled=predictor.amp_dtype == torch.float16)
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.config, self.run_id = config, run_id  # saved inside every checkpoint
        self.samples = samples  # fixed validation images for the per-epoch panel
        self.on_epoch_end = on_epoch_end
        self.display = display or NullDisplay()
        self.stop = stop or StopFlag()
        self.confusion: torch.Tensor | None = None  # of the last validation
        self.paths = {which: checkpoints.path_of(settings.tracking_dir, run_id, which)
                      for which in ("last", "best")}

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
        return checkpoints.pack(state=state, metrics=metrics, config=self.config,
                                run_id=self.run_id, model=self.raw_model,
                                optimizer=self.optimizer, schedule=self.schedule,
                                scaler=self.scaler)

    def restore(self, checkpoint: dict) -> TrainState:
        """Load a checkpoint's weights, optimizer, scheduler, scaler, RNG states; its position."""
        return TrainState(**checkpoints.unpack(checkpoint, model=self.raw_model,
                                               optimizer=self.optimizer, schedule=self.schedule,
                                               scaler=self.scaler))

    def _diverged(self, epoch: int, step: int | None) -> TrainingDiverged:
        """step: the first batch (from 1) with a non-finite loss; None: the loss stayed finite
        but the weights did not (an overflowing update)."""
        last = self.paths["last"]
        kept = (f"the last good checkpoint is {last}" if last.exists()
                else "no checkpoint was written yet")
        what = (f"training loss became NaN or infinite at epoch {epoch}, step {step} (batch {step} "
                f"of that epoch, counting from 1)" if step
                else f"model weights became NaN or infinite in epoch {epoch}")
        return TrainingDiverged(f"{what}; {kept}. Lower optimizer.lr, set trainer.grad_clip_norm, "
                                f"or check the data")

    # ------------------------------------------------------------------ loops

    def train_epoch(self, state: TrainState) -> dict[str, float]:
        epoch, first_batch = state.epoch, state.step_in_epoch
        batches = math.ceil(self.sampler.size / self.train_loader.batch_size)
        self.sampler.set_epoch(epoch, start=first_batch * self.train_loader.batch_size)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device = self.predictor.device
        total_loss = torch.full((), state.loss_sum, dtype=torch.float64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # 1-based batch
        seen, last_refresh, start = state.seen, 0.0, time.perf_counter()
        last_save = time.monotonic()
        self.display.epoch_start(epoch, self.s.epochs, batches, done=first_batch)
        for batch, (images, masks) in enumerate(self.train_loader, start=first_batch + 1):
            x, y = self.predictor.inputs(images), self.predictor.targets(masks)
            loss = self.loss_fn(self.predictor.logits(x), y)
            group_start = (batch - 1) // self.s.accumulate * self.s.accumulate
            # the last group may be short
            group_size = min(self.s.accumulate, batches - group_start)
            self.scaler.scale(loss / group_size).backward()
            at_step = batch % self.s.accumulate == 0 or batch == batches
            if at_step:
                self._optimizer_step()
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), batch, first_bad)
            total_loss += loss.double() * len(images)
            seen += len(images)
            now, shown = time.perf_counter(), None
            if now - last_refresh > PROGRESS_REFRESH_S:  # a sync at most twice a second
                shown, bad, last_refresh = loss.item(), first_bad.item(), now
                if bad > 0:
                    raise self._diverged(epoch, bad)
            self.display.step(len(images), shown, (seen - state.seen) / max(now - start, 1e-9))
            if not at_step or batch == batches:
                continue
            due = (self.s.checkpoint_every_s > 0
                   and time.monotonic() - last_save >= self.s.checkpoint_every_s)
            if self.stop.signum or due:  # the position after this step, exactly
                if first_bad.item() > 0:
                    raise self._diverged(epoch, first_bad.item())
                here = dataclasses.replace(state, step_in_epoch=batch,
                                           loss_sum=total_loss.item(), seen=seen)
                checkpoints.save_atomic(self._checkpoint(here, {}), self.paths["last"])
                last_save = time.monotonic()
                if self.stop.signum:
                    raise Interrupted(self.stop.signum, self.run_id,
                                      f"epoch {epoch}, batch {batch} of {batches}")
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all().double()
        # the epoch's sync
        loss_sum, bad, weights_ok = torch.stack([total_loss, first_bad.double(), finite]).tolist()
        if bad > 0:
            raise self._diverged(epoch, int(bad))
        if not weights_ok:  # a finite loss but an overflowing update: never checkpoint such weights
            raise self._diverged(epoch, None)
        elapsed = time.perf_counter() - start
        return {"train/loss": loss_sum / max(seen, 1),
                "throughput/img_s": (seen - state.seen) / elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def validate(self) -> dict[str, float]:
        found, self.confusion = self.predictor.evaluate(
            self.val_loader, tolerance=self.s.boundary_tolerance, loss_fn=self.loss_fn)
        return {f"val/{k}": v for k, v in found.items()}

    def predict_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(images, targets, predictions) of the fixed validation samples, as numpy arrays."""
        if self.samples is None:
            return None
        images, masks = self.samples
        return images.numpy(), masks.numpy(), self.predictor.predict(images).cpu().numpy()

    def _improved(self, score: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.s.mode == "min":
            return score < best - self.s.min_delta
        return score > best + self.s.min_delta

    def fit(self, state: TrainState | None = None) -> FitResult:
        """Train from `state` (a fresh one, or one restored from a checkpoint) to the last epoch."""
        state = state or TrainState()
        self.paths["last"].parent.mkdir(parents=True, exist_ok=True)
        stopped_early = False
        try:
            while state.epoch <= self.s.epochs:
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
                checkpoint = self._checkpoint(state, metrics)
                checkpoints.save_atomic(checkpoint, self.paths["last"])
                if is_best:
                    checkpoints.save_atomic(checkpoint, self.paths["best"])
                self.display.epoch_end(epoch, metrics, is_best)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, metrics, self.predict_samples())
                if self.s.patience and state.bad_epochs >= self.s.patience:
                    stopped_early = True
                    self.display.message(f"early stop: {self.s.monitor} has not improved for "
                                         f"{state.bad_epochs} epochs (best {state.best_score:.4f} "
                                         f"at epoch {state.best_epoch})")
                    break
                # signalled during validation or logging
                if self.stop.signum and state.epoch <= self.s.epochs:
                    raise Interrupted(self.stop.signum, self.run_id, f"the end of epoch {epoch}")
        finally:
            self.display.close()
        return FitResult(state.history, state.best_epoch, state.best_score, self.paths,
                         stopped_early)
