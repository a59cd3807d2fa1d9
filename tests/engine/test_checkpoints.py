"""The checkpoint module: paths, atomic save, safe load, lookup local or in the artifact store."""

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
    tracker = tracking.Tracker(root=tmp_path, experiment="e")
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
    tracker = tracking.Tracker(root=tmp_path, experiment="e")
    with tracker.session(run_name="r") as run_id:
        broken = tmp_path / "best.pt"
        broken.write_bytes(b"PK\x03\x04 truncated")
        tracker.log_file(broken, "checkpoints")
    with pytest.raises(ConfigError, match=f"artifact checkpoints/best.pt of run {run_id}: "
                                          f"cannot load checkpoint .* truncated or corrupt.*"
                                          f"--checkpoint .*last.pt"):
        checkpoints.fetch(tmp_path, run_id, "best")
