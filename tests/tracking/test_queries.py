"""The named tag queries find the right runs, artifacts leave no temporary folder, and a registered
model is promoted and found by its version or alias."""

import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cityseg import tracking
from cityseg.cli import main
from cityseg.errors import CitysegError
from tests.conftest import frame


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One store for the module (creating one costs seconds); each test its own experiment."""
    return tmp_path_factory.mktemp("store")


def run(tracker, name, status="FINISHED", **tags):
    now = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == now:
        pass  # a millisecond of its own: "newest" is by start time, in milliseconds
    run_id = tracker.create_run(run_name=name, tags=tags)
    if status != "RUNNING":
        tracker.store.client.set_terminated(run_id, status=status)
    return run_id


def ids(runs):
    return [r.info.run_id for r in runs]


def test_a_sweeps_children_parents_and_points(root, request):
    tracker = tracking.open(root, experiment=request.node.name)
    parent = run(tracker, "parent", status="RUNNING", sweep_id="s1", sweep_role="parent")
    a1 = run(tracker, "a", sweep_id="s1", sweep_role="child", sweep_point="pa")
    b = run(tracker, "b", sweep_id="s1", sweep_role="child", sweep_point="pb")
    a2 = run(tracker, "a again", sweep_id="s1", sweep_role="child", sweep_point="pa")
    run(tracker, "other sweep", sweep_id="s2", sweep_role="child", sweep_point="pa")
    assert ids(tracking.sweep_children(tracker, "s1")) == [a2, b, a1]  # newest first
    assert ids(tracking.sweep_parents(tracker, "s1")) == [parent]
    assert ids(tracking.point_runs(tracker, "s1", "pa")) == [a2, a1]
    assert tracking.sweep_parents(tracker, "s3") == []
    compared = tracking.search_runs(root, experiment=request.node.name, sweep_id="s1")
    assert sorted(ids(compared)) == sorted([a1, a2, b])


def test_the_resumable_run_is_the_newest_of_any_hash_if_it_was_interrupted(root, request):
    tracker = tracking.open(root, experiment=request.node.name)
    assert tracking.resumable_run(tracker, "new", "old") is None
    killed = run(tracker, "killed", status="KILLED", config_hash="old")
    assert tracking.resumable_run(tracker, "new", "old") == killed
    run(tracker, "finished", config_hash="new")  # newer and done: nothing to resume
    assert tracking.resumable_run(tracker, "new", "old") is None
    assert tracking.resumable_run(tracker, "old") == killed
    failed = run(tracker, "failed", status="FAILED", config_hash="old")
    assert tracking.resumable_run(tracker, "old") is None  # diverged: it would again
    tracker.store.client.set_tag(failed, "crashed", "pid 1 on host h is gone")
    assert tracking.resumable_run(tracker, "old", "new") == failed  # marked by runs clean


def test_a_complete_run_finished_and_was_not_pruned(root, request):
    tracker = tracking.open(root, experiment=request.node.name)
    done = tracker.get_run(run(tracker, "done"))
    pruned = tracker.get_run(run(tracker, "pruned", pruned="true"))
    killed = tracker.get_run(run(tracker, "killed", status="KILLED"))
    assert [tracking.is_complete(r) for r in (done, pruned, killed)] == [True, False, False]


def test_downloaded_artifacts_leave_no_temporary_folder(root, request, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # not the folders of other tests
    tracker = tracking.open(root, experiment=request.node.name)
    with tracker.session(run_name="r") as run_id:
        tracker.log_text("name: r\n", "config.yaml")
    before = set(Path(tempfile.gettempdir()).glob("cityseg-*"))
    with tracking.downloaded(root, run_id, "config.yaml", missing="has none") as path:
        assert path.read_text() == "name: r\n"
    assert not path.exists() and not path.parent.exists()
    assert tracking.config_text(root, run_id) == "name: r\n"
    with pytest.raises(CitysegError, match=f"run {run_id} has no weights"), \
            tracking.downloaded(root, run_id, "best.pt", missing="has no weights"):
        pass
    with pytest.raises(CitysegError, match="run 'nope' not found in"), \
            tracking.downloaded(root, "nope", "config.yaml", missing=""):
        pass
    assert set(Path(tempfile.gettempdir()).glob("cityseg-*")) == before


def test_promote_and_registered_models_serve_evaluate_and_predict(finished, capsys):
    tmp_path, exp, result, client, run = finished
    runs = str(tmp_path / "runs")
    assert main(["promote", run.info.run_id, "--alias", "champion", "--runs", runs]) == 0
    assert str(client.get_model_version_by_alias("streets", "champion").version) == "1"
    path, photo = frame()
    image = tmp_path / "frame.png"
    Image.fromarray(photo).save(image)
    out = tmp_path / "by-alias"
    assert main(["predict", "--model", "models:/streets@champion", "--runs", runs, str(image),
                 "--out", str(out)]) == 0
    assert main(["predict", "--run", run.info.run_id, "--runs", runs, str(image),
                 "--out", str(tmp_path / "by-run")]) == 0
    by_alias = np.asarray(Image.open(out / "frame_mask.png"))
    assert np.array_equal(by_alias, np.asarray(Image.open(tmp_path / "by-run/frame_mask.png")))
    assert main(["evaluate", "--model", "models:/streets/1", "--runs", runs, "--no-log"]) == 0
    assert main(["evaluate", "--model", "models:/streets/7", "--runs", runs, "--no-log"]) == 2
    assert "not in the registry" in capsys.readouterr().err


def test_a_run_is_named_by_any_unique_start_of_its_id(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    other = tracking.open(tmp_path, experiment="f")
    ids = [tracker.create_run(run_name=f"r{i}", tags={}) for i in range(3)]
    ids.append(other.create_run(run_name="elsewhere", tags={}))
    store = tracker.store
    for run_id in ids:  # the shortest start no other id shares, and the 8 characters printed
        n = next(n for n in range(1, 33)
                 if sum(i.startswith(run_id[:n]) for i in ids) == 1)
        assert tracking.full_run_id(store, run_id[:n]) == run_id
        assert tracking.full_run_id(store, run_id[:8]) == run_id
        assert tracking.full_run_id(store, run_id) == run_id
    assert tracking.full_run_id(store, "auto") == "auto"  # no id's start: left to the caller
    unknown = next(c for c in "0123456789abcdef" if not any(i.startswith(c) for i in ids))
    with pytest.raises(CitysegError, match=f"run {unknown}: no run in .* has an id starting"):
        tracking.full_run_id(store, unknown)


def test_a_start_shared_by_several_runs_lists_them(tmp_path):
    tracker = tracking.open(tmp_path, experiment="e")
    ids: list[str] = []
    while len({i[0] for i in ids}) == len(ids):  # 17 runs at most share a first character
        ids.append(tracker.create_run(run_name=f"r{len(ids)}", tags={}))
    start = ids[-1][0]
    sharing = sorted(i for i in ids if i.startswith(start))
    with pytest.raises(CitysegError, match=rf"run {start}: {len(sharing)} runs in .* have ids "
                                           rf"starting with it; give more of the id:\n  ") as no:
        tracking.full_run_id(tracker.store, start)
    # each candidate listed with its name and status
    listed = re.findall(r"^  ([0-9a-f]{32})  r\d+  \(RUNNING\)$", str(no.value), re.M)
    assert sorted(listed) == sharing
