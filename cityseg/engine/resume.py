"""Finding the checkpoint a run resumes from, and refusing one trained on another experiment."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cityseg.config import Experiment, flatten
from cityseg.errors import ConfigError
from cityseg.tracking import Tracker

RESUMABLE_CHANGES = {"trainer.epochs"}  # what may differ between a checkpoint and its resumed run


def config_hash(config: dict, *, resumable: bool = True) -> str:
    """Identity of an experiment's config: for resuming (ignoring the epoch count, which a
    resumed run may raise), or whole (resumable=False: sweep children)."""
    ignored = RESUMABLE_CHANGES if resumable else set()
    kept = {k: v for k, v in flatten(config).items() if k not in ignored}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def load_checkpoint(path: Path) -> dict:
    """A cityseg checkpoint, loaded safely (weights_only); ConfigError if it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: cannot load checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state" not in checkpoint:
        raise ConfigError(f"{path}: not a cityseg training checkpoint")
    return checkpoint


def find_checkpoint(spec: str, exp: Experiment, tracker: Tracker | None) -> Path | None:
    """RUN_ID, a checkpoint path or auto -> the checkpoint to resume from (None: auto found nothing)."""
    runs = exp.tracking.dir / "checkpoints"
    if Path(spec).is_file():
        return Path(spec)
    if tracker is None:  # no store yet
        if spec == "auto":
            return None
        raise ConfigError(f"--resume {spec}: no MLflow store at {exp.tracking.dir / 'mlflow.db'}")
    if spec == "auto":
        run_id = tracker.resumable_run(config_hash(exp.model_dump(mode="json")))
        return runs / run_id / "last.pt" if run_id and (runs / run_id / "last.pt").is_file() else None
    if tracker.run_exists(spec):
        path = runs / spec / "last.pt"
        if not path.is_file():
            raise ConfigError(f"--resume {spec}: the run has no checkpoint at {path}")
        return path
    raise ConfigError(f"--resume {spec}: neither a checkpoint file nor a run of MLflow experiment "
                      f"'{exp.tracking.experiment}' in {exp.tracking.dir / 'mlflow.db'}")


def check_same_experiment(checkpoint: dict, exp: Experiment, path: Path) -> None:
    """Refuse to resume when anything but the epoch count differs from the checkpoint's config."""
    saved, now = flatten(checkpoint["config"]), flatten(exp.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        lines = "\n  ".join(f"{k}: {saved.get(k, '(absent)')} in the checkpoint, {now.get(k, '(absent)')} now"
                            for k in changed[:12])
        raise ConfigError(f"{path}: cannot resume, the experiment differs from the checkpoint's "
                          f"(only trainer.epochs may change):\n  {lines}")
    epoch, step = checkpoint["state"]["epoch"], checkpoint["state"]["step_in_epoch"]
    if epoch > exp.trainer.epochs:
        done = f"already trained {epoch - 1} epochs" + (f" and {step} batches of epoch {epoch}" if step else "")
        raise ConfigError(f"{path}: {done}; set trainer.epochs to at least {epoch} to continue "
                          f"(--set trainer.epochs=N)")


def check_weights_fit(checkpoint: dict, model: torch.nn.Module, path: Path) -> None:
    """A clear error, before anything is written, when the weights are of another architecture."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ConfigError(f"{path}: the checkpoint's weights do not fit this model: {detail}") from None
