"""Faults in what recovery advises and uses: damaged local checkpoints next to intact copies in
the run's MLflow artifacts (or none), and a checkpoint that holds code. The commands run in
this process (what they read, write and advise is the point, not the process); each test ends
with the run's status and one value per epoch.
"""

import pytest
import torch
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from cityseg import checkpoints, tracking
from cityseg.config import load_experiment
from cityseg.train import runner
from tests.conftest import QUICKSTART, cityseg_here, tiny_overrides


class Gadget:
    """An object of a custom class: unpickling it imports and runs code."""


def settings(tmp_path, *, uploaded: bool, epochs: int = 1) -> list[str]:
    return [*tiny_overrides(tmp_path, epochs=epochs), "tracking.log_model=false",
            "tracking.system_metrics=false", f"tracking.upload_checkpoints={str(uploaded).lower()}"]


def cityseg(*args: str) -> tuple[int, str, str]:
    code, out, err = cityseg_here(*args)
    assert "Traceback" not in err, err
    return code, out, err


def says(output: str, text: str) -> bool:
    """Whether `output` holds `text`, however the console wrapped its lines."""
    return " ".join(text.split()) in " ".join(output.split())


def resume(tmp_path, run_id: str, *, uploaded: bool, epochs: int) -> tuple[int, str, str]:
    overrides = sum((["--set", s] for s in settings(tmp_path, uploaded=uploaded, epochs=epochs)),
                    [])
    return cityseg("run", str(QUICKSTART), *overrides, "--resume", run_id)


def the_run(root, run_id: str):
    """(status, {metric: its steps}) of the run."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    run = client.get_run(run_id)
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)]
             for key in ("train/loss", "val/loss", "val/dice")}
    return run.info.status, steps


def one_value_per_epoch(epochs: int) -> dict[str, list[int]]:
    return dict.fromkeys(("train/loss", "val/loss", "val/dice"), list(range(1, epochs + 1)))


def damage(local: dict) -> None:
    """The fault: last.pt cut in half (a copy interrupted), best.pt left empty (a full disk)."""
    local["last"].write_bytes(local["last"].read_bytes()[: local["last"].stat().st_size // 2])
    local["best"].write_bytes(b"")


def trained(tmp_path, *, uploaded: bool):
    """A FINISHED one-epoch run: (tracking dir, run id, its local {last, best} files)."""
    result = runner.run(load_experiment(QUICKSTART, settings(tmp_path, uploaded=uploaded)))
    return tmp_path / "runs", result.run_id, dict(result.checkpoints)


def without_copies(root, run_id: str) -> None:
    """The run's checkpoints gone from its artifacts, as in a run that did not upload them
    (tracking.upload_checkpoints off) and was killed before its end (which uploads them)."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(
        "checkpoints")


@pytest.fixture(scope="module")
def no_copies(tmp_path_factory):
    """A run without checkpoints among its artifacts, and the bytes of its intact local files
    (each test damages them its own way and reads the run; none of them writes into it)."""
    root, run_id, local = trained(tmp_path_factory.mktemp("no-copies"), uploaded=False)
    without_copies(root, run_id)
    return root, run_id, local, {w: p.read_bytes() for w, p in local.items()}


@pytest.fixture
def intact_again(no_copies):
    root, run_id, local, pristine = no_copies
    for which, data in pristine.items():
        local[which].write_bytes(data)
    return root, run_id, local


def test_damaged_local_files_are_replaced_by_the_runs_artifact_copies(tmp_path):
    root, run_id, local = trained(tmp_path, uploaded=True)
    damage(local)

    code, out, err = cityseg("evaluate", "--run", run_id, "--runs", str(root), "--no-log")
    assert code == 0 and "dice" in out, err
    assert local["best"].read_bytes() == b""  # evaluate reads the copy, it repairs nothing
    assert says(err, f"{local['best']}: cannot load checkpoint: the file is empty")
    assert says(err, f"using the intact copy of best.pt in run {run_id}'s artifacts instead")

    code, out, err = resume(tmp_path, run_id, uploaded=True, epochs=2)
    assert code == 0, err
    assert says(out + err, f"resuming from the intact copy in run {run_id}'s artifacts "
                           f"(the end of epoch 1), put in its place; the damaged file is "
                           f"kept as {local['last']}.damaged")
    assert says(out + err, f"{local['best']}: cannot load checkpoint: the file is empty")
    assert says(out + err, f"replaced by the intact copy in run {run_id}'s artifacts")
    assert checkpoints.load(local["last"])["epoch"] == 2
    assert checkpoints.problem(local["best"]) is None
    assert local["last"].with_name("last.pt.damaged").stat().st_size > 0  # kept for forensics
    with tracking.downloaded(root, run_id, "checkpoints/best.pt", missing="") as copy:
        assert checkpoints.problem(copy) is None  # the empty best.pt was never uploaded
    assert the_run(root, run_id) == ("FINISHED", one_value_per_epoch(2))


def test_evaluate_without_an_intact_copy_says_so_and_advises_no_damaged_file(intact_again):
    root, run_id, local = intact_again
    damage(local)
    code, _, err = cityseg("evaluate", "--run", run_id, "--runs", str(root), "--no-log")
    assert code == 2
    assert f"{local['best']}: cannot load checkpoint: the file is empty" in err
    assert f"run {run_id} has no checkpoints/best.pt among its artifacts" in err
    assert f"the run's last.pt ({local['last']}) cannot be used either (cannot load" in err
    assert "--checkpoint" not in err and f"cityseg run --from-run {run_id}" in err
    assert the_run(root, run_id) == ("FINISHED", one_value_per_epoch(1))


def test_resume_without_an_intact_copy_advises_no_damaged_file(intact_again):
    root, run_id, local = intact_again
    damage(local)
    code, _, err = resume(root.parent, run_id, uploaded=False, epochs=2)
    assert code == 2
    assert f"{local['last']}: cannot load checkpoint (" in err and "truncated or corrupt" in err
    assert f"run {run_id} has no checkpoints/last.pt among its artifacts" in err
    assert f"{local['best']}" in err and "the file is empty" in err
    assert "--fallback-best" not in err  # best.pt does not load: it is no remedy
    assert the_run(root, run_id) == ("FINISHED", one_value_per_epoch(1))


def test_a_checkpoint_holding_code_is_refused_as_such(intact_again):
    root, run_id, local = intact_again
    torch.save({**checkpoints.load(local["best"]), "extra": Gadget()}, local["best"])
    refused = (f"{local['best']}: holds Python objects ({__name__}.Gadget) that weights-only "
               f"loading refuses (it may run code when loaded): cityseg does not load it")
    code, _, err = cityseg("evaluate", "--checkpoint", str(local["best"]), "--no-log")
    assert code == 2 and refused in err
    assert "truncated" not in err and "weights_only" not in err
    code, _, err = cityseg("evaluate", "--run", run_id, "--runs", str(root), "--no-log")
    assert code == 2 and refused in err
    assert f"the run's last.pt ({local['last']}) loads: use it with --checkpoint" in err
    assert the_run(root, run_id) == ("FINISHED", one_value_per_epoch(1))
