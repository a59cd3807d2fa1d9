"""The checkpoint module: paths, atomic save, safe load, lookup local or in the artifact store,
and recovery advice that is checked before it is given."""

import errno
import os
import re
import tempfile

import pytest
import torch

from cityseg import checkpoints, tracking
from cityseg.errors import CitysegError, ConfigError, StorageError


def intact(root, run_id: str, which: str) -> checkpoints.Fetched:
    """A run's intact checkpoint, its copies looked up in the store under root."""
    return checkpoints.intact(root, run_id, which, copies=tracking.run_artifacts(root, run_id))


def restore(root, run_id: str) -> checkpoints.Fetched | None:
    return checkpoints.restore(root, run_id, copies=tracking.run_artifacts(root, run_id))


def minimal(run_id="r1", epoch=2):
    return {"format": checkpoints.FORMAT, "config": {"name": "x"}, "state": {"epoch": epoch},
            "epoch": epoch - 1, "run_id": run_id, "model": {"w": torch.arange(4.0)}}


class Gadget:
    """An object of a custom class: unpickling it imports and runs code, weights-only refuses."""


def run_with_copies(root, *, uploaded=("last", "best")):
    """A run whose last.pt and best.pt are written locally; `uploaded` also go to its artifacts."""
    tracker = tracking.open(root, experiment="e")
    with tracker.session(run_name="r") as run_id:
        for which in ("last", "best"):
            local = checkpoints.path_of(root, run_id, which)
            local.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.save_atomic(minimal(run_id), local)
            if which in uploaded:
                tracker.log_file(local, "checkpoints")
    return run_id, {w: checkpoints.path_of(root, run_id, w) for w in ("last", "best")}


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def test_a_runs_files_live_in_one_place(tmp_path):
    last = checkpoints.path_of(tmp_path, "abc", "last")
    assert last == tmp_path / "checkpoints" / "abc" / "last.pt"
    best = checkpoints.path_of(tmp_path, "abc", "best")
    assert best.parent == checkpoints.run_dir(tmp_path, "abc")


def test_save_atomic_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic(minimal(), path)
    checkpoints.save_atomic({**minimal(), "state": {"epoch": 3}}, path)  # replaces it
    assert checkpoints.load(path)["state"] == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_load_names_the_file_and_what_is_wrong_with_it(tmp_path):
    path = tmp_path / "best.pt"
    checkpoints.save_atomic(minimal(), path)
    truncate(path)
    with pytest.raises(checkpoints.Unreadable, match=f"{path}: cannot load checkpoint .*"
                                                     f"truncated or corrupt"):
        checkpoints.load(path)
    path.write_bytes(b"garbage")  # the weights-only unpickler's "unsupported operand"
    with pytest.raises(checkpoints.Unreadable, match="truncated or corrupt") as garbage:
        checkpoints.load(path)
    assert "weights_only" not in str(garbage.value)
    path.write_bytes(b"")
    with pytest.raises(checkpoints.Unreadable, match=r"best.pt: cannot load checkpoint: the "
                                                     r"file is empty \(0 bytes"):
        checkpoints.load(path)
    with pytest.raises(checkpoints.Unreadable, match=r"nope.pt: no such file$"):
        checkpoints.load(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ConfigError, match="other.pt: not a cityseg training checkpoint"):
        checkpoints.load(other)


def test_a_checkpoint_holding_code_is_refused_as_such_without_torchs_advice(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({**minimal(), "extra": Gadget()}, path)
    with pytest.raises(checkpoints.Unreadable, match=re.escape(
            f"{path}: holds Python objects ({__name__}.Gadget) that weights-only loading refuses "
            f"(it may run code when loaded): cityseg does not load it")) as refused:
        checkpoints.load(path)
    assert "truncated" not in str(refused.value) and "weights_only" not in str(refused.value)
    assert isinstance(refused.value, ConfigError)  # the CLI's exit 2


@pytest.mark.parametrize("saved", [{"format": checkpoints.FORMAT + 1}, {}])
def test_a_checkpoint_of_another_format_is_refused_naming_the_file_and_both_formats(tmp_path,
                                                                                   saved):
    path = tmp_path / "best.pt"
    checkpoint = {k: v for k, v in minimal().items() if k != "format"}
    checkpoints.save_atomic({**checkpoint, **saved}, path)
    found = repr(saved["format"]) if saved else "missing"
    with pytest.raises(ConfigError, match=f"{path}: checkpoint format {found}, but this cityseg "
                                          f"reads format {checkpoints.FORMAT}"):
        checkpoints.load(path)


def test_problem_says_why_a_file_cannot_be_used_and_nothing_when_it_loads(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic(minimal(), path)
    assert checkpoints.problem(path) is None
    path.write_bytes(b"")
    assert checkpoints.problem(path).startswith("cannot load checkpoint: the file is empty")


def test_intact_prefers_the_local_file_and_falls_back_to_the_runs_artifact(tmp_path):
    run_id, local = run_with_copies(tmp_path)
    found = intact(tmp_path, run_id, "best")
    assert found.path == local["best"] and found.note is None
    local["best"].unlink()
    found = intact(tmp_path, run_id, "best")
    assert found.path != local["best"] and found.checkpoint["run_id"] == run_id
    assert found.note is None  # a missing local file is normal (another machine)


def test_a_run_without_any_checkpoint_says_so(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    with tracker.session(run_name="r") as run_id:
        pass
    with pytest.raises(CitysegError, match=f"run {run_id} has no model .*last.pt does not "
                                           f"exist, and run {run_id} has no checkpoints/last.pt "
                                           f"among its artifacts"):
        intact(tmp_path, run_id, "last")
    assert restore(tmp_path, run_id) is None
    assert restore(tmp_path, "nope") is None


def test_a_damaged_local_file_falls_back_to_the_intact_artifact_copy_with_a_note(tmp_path):
    run_id, local = run_with_copies(tmp_path)
    truncate(local["best"])
    damaged = local["best"].read_bytes()
    found = intact(tmp_path, run_id, "best")
    assert found.checkpoint["run_id"] == run_id and found.path != local["best"]
    assert re.match(f"{re.escape(str(local['best']))}: cannot load checkpoint .* truncated or "
                    f"corrupt .*\n  using the intact copy of best.pt in run {run_id}'s "
                    f"artifacts instead$", found.note, re.S)
    assert local["best"].read_bytes() == damaged  # evaluate reads; it does not repair


def test_without_an_intact_copy_the_advice_names_only_a_file_that_loads(tmp_path):
    run_id, local = run_with_copies(tmp_path, uploaded=())
    truncate(local["best"])
    with pytest.raises(checkpoints.Unreadable, match=(
            f"best.pt: cannot load checkpoint .*\n  run {run_id} has no checkpoints/best.pt "
            f"among its artifacts .*\n  the run's last.pt .* loads: use it with --checkpoint "
            f"{re.escape(str(local['last']))}")):
        intact(tmp_path, run_id, "best")
    local["last"].write_bytes(b"")
    with pytest.raises(checkpoints.Unreadable, match=r"the run's last.pt .* cannot be used "
                                                     r"either \(cannot load checkpoint: the file "
                                                     r"is empty") as both:
        intact(tmp_path, run_id, "best")
    assert "--checkpoint" not in str(both.value) and f"--from-run {run_id}" in str(both.value)


def test_a_damaged_artifact_copy_is_named_with_what_to_do(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    with tracker.session(run_name="r") as run_id:
        broken = tmp_path / "best.pt"
        broken.write_bytes(b"PK\x03\x04 truncated")
        tracker.log_file(broken, "checkpoints")
    with pytest.raises(checkpoints.Unreadable, match=(
            f"best.pt does not exist\n  its copy in run {run_id}'s artifacts "
            f"\\(checkpoints/best.pt\\): cannot load checkpoint .* truncated or corrupt.*\n  "
            f"the run's last.pt .* does not exist; or re-train \\(cityseg run --from-run")):
        intact(tmp_path, run_id, "best")


def test_restore_replaces_damaged_files_by_their_copies_and_keeps_them_aside(tmp_path):
    run_id, local = run_with_copies(tmp_path)
    truncate(local["last"])
    local["best"].write_bytes(b"")
    damaged = local["last"].read_bytes()
    found = restore(tmp_path, run_id)
    assert found.path == local["last"] and found.checkpoint["run_id"] == run_id
    for which in ("last", "best"):
        assert checkpoints.problem(local[which]) is None
    assert local["last"].with_name("last.pt.damaged").read_bytes() == damaged
    assert sorted(p.name for p in local["last"].parent.iterdir()) == [
        "best.pt", "best.pt.damaged", "last.pt", "last.pt.damaged"]  # no temporary file
    best_note, last_note = (re.escape(f"{local[w]}.damaged") for w in ("best", "last"))
    assert re.match(f".*last.pt: cannot load checkpoint .*\n  resuming from the intact copy in "
                    f"run {run_id}'s artifacts \\(the end of epoch 1\\), put in its place; "
                    f"the damaged file is kept as {last_note}\n.*best.pt: cannot load "
                    f"checkpoint: the file is empty .*\n  replaced by the intact copy in run "
                    f"{run_id}'s artifacts; the damaged file is kept as {best_note}$",
                    found.note, re.S)
    again = restore(tmp_path, run_id)
    assert again.path == local["last"] and again.note is None


def test_restore_puts_a_missing_last_in_place_without_leaving_a_download_behind(
        tmp_path, monkeypatch):
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    root = tmp_path / "runs"
    run_id, local = run_with_copies(root)
    for path in local.values():
        path.unlink()
    assert intact(root, run_id, "best").checkpoint["run_id"] == run_id
    assert not local["best"].exists()  # read, not put in place
    found = restore(root, run_id)
    assert found.path == local["last"] and found.note is None
    assert checkpoints.load(local["last"])["run_id"] == run_id
    assert checkpoints.problem(local["best"]) is None  # the run's end needs it
    assert list(downloads.iterdir()) == []


def test_restore_without_an_intact_copy_names_the_damaged_file_and_leaves_it(tmp_path):
    run_id, local = run_with_copies(tmp_path, uploaded=())
    truncate(local["last"])
    damaged = local["last"].read_bytes()
    with pytest.raises(checkpoints.Unreadable, match=(
            f"last.pt: cannot load checkpoint .*\n  run {run_id} has no checkpoints/last.pt "
            f"among its artifacts")) as refused:
        restore(tmp_path, run_id)
    assert refused.value.path == local["last"] and local["last"].read_bytes() == damaged
    assert "--fallback-best" not in str(refused.value)  # resume's advice, checked there
    checkpoints.save_atomic(minimal(run_id), local["last"])
    local["best"].write_bytes(b"")
    found = restore(tmp_path, run_id)  # training goes on; the note says what stays
    assert found.path == local["last"] and local["best"].read_bytes() == b""
    assert re.match(f".*best.pt: cannot load checkpoint: the file is empty .*\n  run {run_id} has "
                    f"no checkpoints/best.pt among its artifacts .*: it stays; an epoch that "
                    f"improves on the run's best score rewrites it", found.note, re.S)


def test_a_full_disk_while_a_copy_is_put_in_place_claims_no_intact_file(tmp_path, monkeypatch):
    run_id, local = run_with_copies(tmp_path)
    truncate(local["last"])

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="cannot write checkpoint .*last.pt: No space left "
                                           "on device. Free space") as failed:
        restore(tmp_path, run_id)
    assert "intact" not in str(failed.value)
    assert local["last"].with_name("last.pt.damaged").is_file()
    assert not local["last"].with_name(".last.pt.part").exists()
    monkeypatch.undo()
    assert restore(tmp_path, run_id).path == local["last"]  # the next try works
