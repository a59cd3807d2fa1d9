"""The checkpoint module: paths, atomic save, safe load, lookup local or in the artifact store."""

import tempfile

import pytest
import torch

from cityseg import tracking
from cityseg.engine import checkpoints
from cityseg.errors import CitysegError, ConfigError


def minimal(run_id="r1"):
    return {"format": checkpoints.FORMAT, "config": {"name": "x"}, "state": {"epoch": 2},
            "run_id": run_id, "model": {"w": torch.arange(4.0)}}


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


def test_load_names_the_file_when_it_is_truncated_or_not_a_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    checkpoints.save_atomic(minimal(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"{path}: cannot load checkpoint"):
        checkpoints.load(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ConfigError, match="not a cityseg training checkpoint"):
        checkpoints.load(other)


def test_fetch_prefers_the_local_file_and_falls_back_to_the_runs_artifact(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    with tracker.session(run_name="r") as run_id:
        local = checkpoints.path_of(tmp_path, run_id, "best")
        local.parent.mkdir(parents=True)
        checkpoints.save_atomic(minimal(run_id), local)
        tracker.log_file(local, "checkpoints")
    assert checkpoints.fetch(tmp_path, run_id, "best")[0] == local
    local.unlink()
    fetched, loaded = checkpoints.fetch(tmp_path, run_id, "best")
    assert fetched != local and loaded["run_id"] == run_id
    with pytest.raises(CitysegError, match="no checkpoints/last.pt"):
        checkpoints.fetch(tmp_path, run_id, "last")


def test_a_corrupt_artifact_is_named_with_what_to_do(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    with tracker.session(run_name="r") as run_id:
        broken = tmp_path / "best.pt"
        broken.write_bytes(b"PK\x03\x04 truncated")
        tracker.log_file(broken, "checkpoints")
    with pytest.raises(ConfigError, match=f"artifact checkpoints/best.pt of run {run_id}: "
                                          f"cannot load checkpoint .* truncated or corrupt.*"
                                          f"--checkpoint .*last.pt"):
        checkpoints.fetch(tmp_path, run_id, "best")


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


def test_artifacts_are_fetched_and_put_in_place_without_leaving_a_download_behind(
        tmp_path, monkeypatch):
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    root = tmp_path / "runs"
    tracker = tracking.open(root, experiment="e")
    with tracker.session(run_name="r") as run_id:
        for which in ("best", "last"):
            local = checkpoints.path_of(root, run_id, which)
            local.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.save_atomic(minimal(run_id), local)
            tracker.log_file(local, "checkpoints")
            local.unlink()
    assert checkpoints.fetch(root, run_id, "best")[1]["run_id"] == run_id
    assert not checkpoints.path_of(root, run_id, "best").exists()  # read, not put in place
    last = checkpoints.last_in_place(root, run_id)
    assert last == checkpoints.path_of(root, run_id, "last")
    assert checkpoints.load(last)["run_id"] == run_id
    assert checkpoints.last_in_place(root, "nope") is None
    assert list(downloads.iterdir()) == []
