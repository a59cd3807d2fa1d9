"""Checkpoints: the format, where a run's files live, atomic save, safe load, and lookup.

A checkpoint is a dict holding everything needed to continue exactly: weights, optimizer,
scheduler, gradient scaler, RNG states and the loop's position (down to the batch when a
signal stopped a run mid-epoch; train/state.py packs them), plus the resolved config and the
run id it belongs to.
Training writes `<tracking.dir>/checkpoints/<run id>/{last,best}.pt`; the run also uploads
them as MLflow artifacts, where any command finds them when the local files are gone or
damaged. Every file is checked by loading it before it is used or advised.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from cityseg.errors import CitysegError, ConfigError, StorageError
from cityseg.runtime.files import written_whole

FORMAT = 1
Which = Literal["last", "best"]


def run_dir(root: Path, run_id: str) -> Path:
    """The folder of a run's checkpoints under a tracking dir."""
    return root / "checkpoints" / run_id


def path_of(root: Path, run_id: str, which: Which) -> Path:
    """`last.pt` (where training continues from) or `best.pt` (the monitored best) of a run."""
    return run_dir(root, run_id) / f"{which}.pt"


def position(epoch: int, step_in_epoch: int) -> str:
    """Where in training a loop position stands, in words: `batch 3 of epoch 2` (stopped
    mid-epoch), `the end of epoch 1`."""
    if step_in_epoch:
        return f"batch {step_in_epoch} of epoch {epoch}"
    return f"the end of epoch {epoch - 1}"


class Copies(Protocol):
    """A run's artifacts in the store it was tracked in (`tracking.run_artifacts`):
    `copies(artifact, missing=...)` is a block holding the downloaded file, CitysegError when
    the store, the run or the file is not there (`missing` says what, after "run RUN_ID")."""

    def __call__(self, artifact: str, *, missing: str) -> AbstractContextManager[Path]: ...


class Unreadable(ConfigError):
    """A checkpoint file that cannot be used (missing, empty, corrupt, another format, holding
    Python objects): `path` is the file, `reason` why (without the file's name)."""

    def __init__(self, message: str, *, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class _NoCopy(Exception):
    """The run's artifacts hold no copy of the checkpoint, or cannot be read: says which."""


@dataclass(frozen=True)
class Fetched:
    """A checkpoint that loads, the file it was read from, and what was done to find it."""

    path: Path  # a download in a removed temporary folder when read from the run's artifacts
    checkpoint: dict
    note: str | None = None  # a local file could not be used: what was used instead (to show)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill never leaves half a checkpoint, and
    a full disk leaves the previous one intact (StorageError naming the file)."""
    # serialised in memory first: torch's writer hides a full disk behind an "unexpected pos"
    # RuntimeError, a plain write reports ENOSPC as it is
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_atomic(buffer.getbuffer(), path)


def _write_atomic(data, path: Path) -> None:
    """Bytes to `path`, whole or not at all (fsync before the rename)."""
    try:
        with written_whole(path, fsync=True) as partial:
            partial.write_bytes(data)
    except OSError as err:
        kept = f"; the previous {path.name} is intact" if path.is_file() else ""
        raise StorageError(f"cannot write checkpoint {path}: {err.strerror or err}{kept}. Free "
                           f"space there or point tracking.dir elsewhere, then resume") from None


def load(path: Path, *, name: str | None = None) -> dict:
    """A cityseg checkpoint, loaded safely (weights_only). Unreadable naming the file (or
    `name`, e.g. an artifact of a run) when it is missing, empty, truncated or corrupt, holds
    Python objects, is not a checkpoint or is of a format this cityseg does not read."""
    shown = name or str(path)

    def refuse(reason: str) -> Unreadable:
        return Unreadable(f"{shown}: {reason}", path=path, reason=reason)

    checkpoint = _torch_load(path, refuse)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state" not in checkpoint:
        raise refuse("not a cityseg training checkpoint")
    if "format" not in checkpoint or checkpoint["format"] != FORMAT:
        found = repr(checkpoint["format"]) if "format" in checkpoint else "missing"
        raise refuse(f"checkpoint format {found}, but this cityseg reads format {FORMAT} "
                     f"(written by another version of cityseg?)")
    return checkpoint


CUT_SHORT = "a crash or a full disk while it was written or copied?"


def _torch_load(path: Path, refuse: Callable[[str], Unreadable]):
    """torch.load(weights_only=True), each failure said as what it means for the file."""
    if not path.is_file():
        raise refuse("no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise refuse(f"cannot load checkpoint: the file is empty (0 bytes; {CUT_SHORT})")
    try:
        with warnings.catch_warnings():  # its unpickler warns of any pickle protocol but 2
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise refuse(f"cannot read it ({err.strerror or err})") from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        text = str(err)
        # torch's own advice (load with weights_only=False) would run the file's code: not given
        detail = text.partition("WeightsUnpickler error:")[2] or text
        refused = re.search(r"GLOBAL (\S+)", detail)
        # the weights-only unpickler refused a well-formed pickle (a GLOBAL, an opcode it does
        # not run: a raw pickle, a foreign data.pkl); bytes that are no pickle are corrupt
        if "Weights only load failed" in text and (refused or _holds_a_pickle(path)):
            what = f" ({refused.group(1)})" if refused else ""
            raise refuse(f"holds Python objects{what} that weights-only loading refuses (it may "
                         f"run code when loaded): cityseg does not load it; use a checkpoint "
                         f"that cityseg training wrote") from None
        line = next((s.strip() for s in detail.splitlines() if s.strip()), type(err).__name__)
        raise refuse(f"cannot load checkpoint ({line.split('. ')[0][:200]}); the file is "
                     f"truncated or corrupt ({CUT_SHORT})") from None


def _holds_a_pickle(path: Path) -> bool:
    """Whether the file is (or its zip's data.pkl is) a whole, well-formed pickle stream, read
    by pickletools without running anything."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[-1]) if names else b""
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001  (a broken zip or stream: not a pickle)
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used, None when it loads: advice names a file
    only after this check."""
    try:
        load(path)
    except Unreadable as err:
        return err.reason
    return None


def check_weights_fit(checkpoint: dict, model: nn.Module, path: Path) -> None:
    """A clear error, before anything is written, when the weights are of another architecture."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ConfigError(f"{path}: the checkpoint's weights do not fit this model: "
                          f"{detail}") from None


# ---------------------------------------------------------------- a run's files, local or copied


def intact(root: Path, run_id: str, which: Which, *, copies: Copies | None) -> Fetched:
    """A run's checkpoint that loads: the local file training wrote, else the copy in the run's
    MLflow artifacts (read from a download, not put in place), with a note when the local file
    is there but unusable. Unreadable when there is no intact copy, with checked advice.
    `copies`: the run's artifacts in its own store (None: the local file only)."""
    try:
        found, damage = _local_or_copy(root, run_id, which, copies, put=False)
    except _NoCopy as err:
        raise CitysegError(f"run {run_id} has no model (it may have failed before its first "
                           f"epoch ended): {path_of(root, run_id, which)} does not exist, and "
                           f"{err}") from None
    except Unreadable as err:
        raise Unreadable(f"{err}\n  {_other_advice(root, run_id, which)}", path=err.path,
                         reason=err.reason) from None
    if damage is None:
        return found
    return replace(found, note=f"{damage}\n  using the intact copy of {which}.pt in run "
                               f"{run_id}'s artifacts instead")


def _other_advice(root: Path, run_id: str, which: Which) -> str:
    """What to use instead of a run's unusable checkpoint: its other one only if it loads."""
    other = path_of(root, run_id, "last" if which == "best" else "best")
    if not other.exists():
        there = "does not exist"
    elif (why := problem(other)) is not None:
        there = f"cannot be used either ({why})"
    else:
        there = f"loads: use it with --checkpoint {other}"
    return (f"the run's {other.name} ({other}) {there}; or re-train (cityseg run --from-run "
            f"{run_id})")


def restore(root: Path, run_id: str, *, copies: Copies | None) -> Fetched | None:
    """For resuming: a run's missing or damaged last.pt and best.pt replaced by their intact
    copies from its MLflow artifacts (`copies`, as `intact`; a damaged one kept as
    NAME.damaged); last.pt, loaded, with a note of what was done. None: no last.pt anywhere;
    Unreadable: no intact one."""
    notes = [_restore_best(root, run_id, copies)]
    try:
        found, damage = _local_or_copy(root, run_id, "last", copies, put=True)
    except _NoCopy:
        return None  # never checkpointed (or not here): nothing to resume from
    if damage is not None:
        state = found.checkpoint["state"]
        where = position(state["epoch"], state.get("step_in_epoch", 0))  # absent: older files
        notes.insert(0, f"{damage}\n  resuming from the intact copy in run {run_id}'s artifacts "
                        f"({where}), put in its place; the damaged file is kept as "
                        f"{_aside(found.path)}")
    return replace(found, note=_lines(notes))


def _restore_best(root: Path, run_id: str, copies: Copies | None) -> str | None:
    """best.pt made whole beside last.pt (the run's end uploads and logs it); a note when the
    local file was damaged, or could not be made whole."""
    try:
        found, damage = _local_or_copy(root, run_id, "best", copies, put=True)
    except _NoCopy:
        return None
    except Unreadable as err:
        if not path_of(root, run_id, "best").is_file():
            return str(err)
        return (f"{err}: it stays; an epoch that improves on the run's best score rewrites "
                f"it, until then the run's end cannot log the model from it")
    if damage is None:
        return None
    return (f"{damage}\n  replaced by the intact copy in run {run_id}'s artifacts; the damaged "
            f"file is kept as {_aside(found.path)}")


def _local_or_copy(root: Path, run_id: str, which: Which, copies: Copies | None, *,
                   put: bool) -> tuple[Fetched, Unreadable | None]:
    """A run's checkpoint and the local file's damage: the local file when it loads (None),
    else the copy in the run's artifacts (put in the local file's place when `put`) and why
    the local file was not used. _NoCopy: neither exists; Unreadable: neither loads (both
    named)."""
    local = path_of(root, run_id, which)
    damage: Unreadable | None = None
    if local.is_file():
        try:
            return Fetched(local, load(local)), None
        except Unreadable as err:
            damage = err
    try:
        return _artifact_copy(run_id, which, copies, put_at=local if put else None), damage
    except (_NoCopy, Unreadable) as err:
        if damage is None and isinstance(err, _NoCopy):
            raise
        first = str(damage) if damage is not None else f"{local} does not exist"
        raise Unreadable(f"{first}\n  {err}", path=local,
                         reason=damage.reason if damage else str(err)) from None


def _artifact_copy(run_id: str, which: Which, copies: Copies | None, *,
                   put_at: Path | None = None) -> Fetched:
    """The copy of a run's checkpoint in its MLflow artifacts, loaded, and when `put_at` is
    given, written there atomically (a damaged file there moved aside first). _NoCopy when the
    run has none (or the store cannot be read); Unreadable when the copy does not load."""
    artifact = f"checkpoints/{which}.pt"
    if copies is None:
        raise _NoCopy(f"run {run_id}'s artifacts were not looked in")
    with contextlib.ExitStack() as stack:
        try:
            copy = stack.enter_context(copies(
                artifact, missing=f"has no {artifact} among its artifacts (runs upload them "
                                  f"with tracking.upload_checkpoints)"))
        except CitysegError as err:  # no store, no such run or file, a server that is down
            raise _NoCopy(str(err)) from None
        checkpoint = load(copy, name=f"its copy in run {run_id}'s artifacts ({artifact})")
        if put_at is None:
            return Fetched(copy, checkpoint)
        put_at.parent.mkdir(parents=True, exist_ok=True)
        if put_at.exists():  # damaged (the callers checked): kept for whoever looks into why
            os.replace(put_at, _aside(put_at))
        _write_atomic(copy.read_bytes(), put_at)
        return Fetched(put_at, checkpoint)


def _aside(path: Path) -> Path:
    """Where a damaged checkpoint is kept once replaced (not *.pt: never uploaded or loaded)."""
    return path.with_name(f"{path.name}.damaged")


def _lines(notes: list[str | None]) -> str | None:
    return "\n".join(n for n in notes if n) or None


