"""The training loop's state: its position and memory (TrainState), the flag a signal sets
(StopFlag) and what training made (FitResult); the state packed into a checkpoint
with the weights, optimizer, scheduler, gradient scaler and RNG states, and unpacked to
continue exactly where it stopped."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cityseg import checkpoints


@dataclass
class FitResult:
    """What training made: every epoch's metrics, the best epoch and its score, the
    checkpoints (last, best), whether it stopped before its last epoch."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]
    stopped_early: bool


class StopFlag:
    """Set by a signal handler; the trainer stops at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.signum = 0


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
    world_size: int = 1  # processes that trained it: a mid-epoch position belongs to them
    # training ended before the last epoch (patience, a pruned sweep trial): only the run's
    # end (uploads, reports, the model) remains
    stopped_early: bool = False

    @property
    def position(self) -> str:
        """Where in training this state stands, in words."""
        return checkpoints.position(self.epoch, self.step_in_epoch)


def pack(*, state: TrainState, metrics: dict[str, float], config: dict, run_id: str,
         model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
         scaler: torch.amp.GradScaler) -> dict:
    """A checkpoint of the training loop at `state`."""
    return {"format": checkpoints.FORMAT, "epoch": state.epoch - (state.step_in_epoch == 0),
            "metrics": metrics, "config": config, "run_id": run_id, "state": asdict(state),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}


def unpack(checkpoint: dict, *, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
           scaler: torch.amp.GradScaler) -> TrainState:
    """Load weights, optimizer, scheduler, scaler and RNG states; returns the loop's state."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return saved_state(checkpoint)


def saved_state(checkpoint: dict) -> TrainState:
    """The loop's position a checkpoint holds (keys added since it was written take the
    defaults TrainState declares)."""
    return TrainState(**checkpoint["state"])


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(py_state), gauss],
             "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [pos, has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    pos, has_gauss, cached = state["numpy_rest"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
