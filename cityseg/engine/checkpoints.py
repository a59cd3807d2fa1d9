"""Checkpoints: the format, where a run's files live, atomic save, safe load, and lookup.

A checkpoint is a dict holding everything needed to continue exactly: weights, optimizer,
scheduler, gradient scaler, RNG states and the loop's position (down to the batch when a
signal stopped a run mid-epoch), plus the resolved config and the run id it belongs to.
Training writes `<tracking.dir>/checkpoints/<run id>/{last,best}.pt`; the run also uploads
them as MLflow artifacts, where any command finds them when the local files are gone.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from cityseg import tracking
from cityseg.errors import CitysegError, ConfigError, StorageError

FORMAT = 1
Which = Literal["last", "best"]


def run_dir(root: Path, run_id: str) -> Path:
    """The folder of a run's checkpoints under a tracking dir."""
    return root / "checkpoints" / run_id


def path_of(root: Path, run_id: str, which: Which) -> Path:
    """`last.pt` (where training continues from) or `best.pt` (the monitored best) of a run."""
    return run_dir(root, run_id) / f"{which}.pt"


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



def pack(*, state: TrainState, metrics: dict[str, float], config: dict, run_id: str,
         model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
         scaler: torch.amp.GradScaler) -> dict:
    """A checkpoint of the training loop at `state`."""
    return {"format": FORMAT, "epoch": state.epoch - (state.step_in_epoch == 0),
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


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill never leaves half a checkpoint, and
    a full disk leaves the previous one intact (StorageError naming the file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    # serialised in memory first: torch's writer hides a full disk behind an "unexpected pos"
    # RuntimeError, a plain write reports ENOSPC as it is
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.is_file() else ""
        raise StorageError(f"cannot write checkpoint {path}: {err.strerror or err}{kept}. Free "
                           f"space there or point tracking.dir elsewhere, then resume") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path, *, name: str | None = None) -> dict:
    """A cityseg checkpoint, loaded safely (weights_only); ConfigError naming the file (or
    `name`, e.g. an artifact of a run) if it is unreadable, truncated, not a checkpoint or of
    a format this cityseg does not read."""
    shown = name or str(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(f"{shown}: cannot load checkpoint ({reason}); the file is truncated "
                          f"or corrupt (a crash or a full disk while it was copied?)") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state" not in checkpoint:
        raise ConfigError(f"{shown}: not a cityseg training checkpoint")
    if "format" not in checkpoint or checkpoint["format"] != FORMAT:
        found = repr(checkpoint["format"]) if "format" in checkpoint else "missing"
        raise ConfigError(f"{shown}: checkpoint format {found}, but this cityseg reads format "
                          f"{FORMAT} (written by another version of cityseg?)")
    return checkpoint


def check_weights_fit(checkpoint: dict, model: nn.Module, path: Path) -> None:
    """A clear error, before anything is written, when the weights are of another architecture."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ConfigError(f"{path}: the checkpoint's weights do not fit this model: "
                          f"{detail}") from None


def fetch(root: Path, run_id: str, which: Which) -> tuple[Path, dict]:
    """A run's checkpoint, (path, loaded): the local file training wrote, else the run's MLflow
    artifact (its path then names the download, removed once loaded). A corrupt one is a
    ConfigError that names it and the other places to look."""
    local = path_of(root, run_id, which)
    other = path_of(root, run_id, "last" if which == "best" else "best")
    advice = (f"; try the run's other checkpoint (--checkpoint {other}) if it is there, or "
              f"re-train (cityseg run --from-run {run_id})")
    if local.is_file():
        try:
            return local, load(local)
        except ConfigError as err:
            raise ConfigError(f"{err}{advice}") from None
    artifact = f"checkpoints/{which}.pt"
    with tracking.downloaded(
            root, run_id, artifact,
            missing=f"has no model: no {artifact} (it may have failed before its first epoch "
                    f"ended)") as path:
        try:
            return path, load(path, name=f"artifact {artifact} of run {run_id}")
        except ConfigError as err:
            raise ConfigError(f"{err}{advice}") from None


def last_in_place(root: Path, run_id: str) -> Path | None:
    """The run's last.pt where training writes it: the local file, else its MLflow artifact
    downloaded there (a run resumed on another machine); None when neither exists."""
    local = path_of(root, run_id, "last")
    if local.is_file():
        return local
    try:
        with tracking.downloaded(root, run_id, "checkpoints/last.pt", missing="") as fetched:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(fetched, local)
    except CitysegError:  # no store, no such run, or a run without last.pt
        return None
    return local


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
