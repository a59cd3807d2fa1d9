"""Sweeps: a parent with nested children, parallel jobs, skipping finished children, summaries."""

import json
import pickle
import signal
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from cityseg.cli import main
from cityseg.engine import runner
from cityseg.engine.sweep import load_sweep, run_sweep
from cityseg.errors import ConfigError, Interrupted
from cityseg.tracking import tracking_uri
from tests.conftest import QUICKSTART, tiny_overrides


def write_sweep(tmp_path, grid, **extra):
    """A tiny base experiment (the quickstart, shrunk, store in tmp_path) and a sweep over it."""
    base = {"base": str(QUICKSTART)}
    for override in [*tiny_overrides(tmp_path), "tracking.log_model=false"]:
        key, value = override.split("=", 1)
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "tiny", "base": "tiny.yaml", "metric": "val/dice", **extra,
             **({"grid": grid} if grid is not None else {})}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def runs(tmp_path):
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    experiment = client.get_experiment_by_name("quickstart")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in found if r.data.tags.get("sweep_role") == "child"]
    return client, parents, children


def test_parallel_sweep_nests_children_summarises_and_skips_finished_on_rerun(tmp_path):
    path = write_sweep(tmp_path, {"loss.pos_weight": [1, 2, 4]},
                       description="how much the foreground weight matters")
    result = run_sweep(path, jobs=2, report=lambda line: None)
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.note.content"] == "how much the foreground weight matters"
    # children running at once all logged the same two datasets (a unique-row race in MLflow)
    for child in children:
        contexts = sorted(i.tags[0].value for i in child.inputs.dataset_inputs)
        assert contexts == ["training", "validation"]
    assert sorted(float(c.data.params["loss.pos_weight"]) for c in children) == [1.0, 2.0, 4.0]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.info.run_name.startswith("pos_weight=")
        for key in ("train/loss", "val/loss", "val/dice", "val/iou"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"summary.csv", "sweep.yaml", "predictions_by_child.png",
            "plots/loss_pos_weight.png"} <= artifacts
    assert parent.data.tags["best_child_run_id"] == result.rows[0]["run_id"]
    dice = [row["val/dice"] for row in result.rows]
    assert dice == sorted(dice, reverse=True)

    again = run_sweep(path, jobs=2, report=lambda line: None)
    client, parents, children_after = runs(tmp_path)
    assert len(parents) == 1 and len(children_after) == 3  # no new child
    assert again.parent_id == parent.info.run_id

    # a new, empty Optuna study: its trials find the FINISHED children by config hash
    lines = []
    fresh = run_sweep(path, storage=f"sqlite:///{tmp_path}/other.db", report=lines.append)
    assert sum("already FINISHED" in line for line in lines) == 3
    assert not any(": training (trial" in line for line in lines)
    assert fresh.parent_id == parent.info.run_id and len(fresh.rows) == 3


@pytest.mark.parametrize("stop",
                         [KeyboardInterrupt(), Interrupted(signal.SIGTERM, "run", "epoch 1")],
                         ids=["keyboard", "signal"])
def test_interrupted_sweep_resumes_with_only_the_missing_children(tmp_path, monkeypatch, stop):
    path = write_sweep(tmp_path, {"loss.pos_weight": [1, 2, 4]})
    real_run = runner.run
    calls = {"n": 0}

    def interrupt_second_child(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise stop  # what a child's run raises on Ctrl-C / SIGTERM: the sweep must stop too
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", interrupt_second_child)
    with pytest.raises(type(stop)):
        run_sweep(path, jobs=1, report=lambda line: None)
    client, parents, children = runs(tmp_path)
    assert parents[0].info.status == "KILLED" and len(children) == 1
    first = children[0].info.run_id

    monkeypatch.setattr(runner, "run", real_run)
    lines = []
    run_sweep(path, jobs=1, report=lines.append)
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and first in {c.info.run_id for c in children}
    # the study knows the finished point: only the two missing ones are trained
    assert sum(": training (trial" in line for line in lines) == 2
    # the interrupted point went back into the queue with its grid id: GridSampler's
    # bookkeeping sees every point of the grid done once
    import optuna

    study = optuna.load_study(study_name=parents[0].data.tags["sweep_id"],
                              storage=f"sqlite:///{tmp_path}/runs/optuna.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.system_attrs["grid_id"] for t in complete) == [0, 1, 2]
    assert sorted(t.params["loss.pos_weight"] for t in complete) == [1, 2, 4]


def test_every_grid_point_is_validated_before_anything_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, {"model.depth": [2, 9]})
    with pytest.raises(ConfigError, match=r"(?s)grid point depth=9: .*model\.depth: "
                                          r".*less than or equal to 7"):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    assert "grid point depth=9" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sweep_files_in_the_repository_validate():
    for name in ("fg_weight_quick.yaml", "fg_weight.yaml"):
        points = load_sweep(QUICKSTART.parent / "sweeps" / name).points
        assert ([p.values["loss.pos_weight"] for p in points][:5] == [1, 2, 4, 8, 16]
                or len(points) == 15)
    search = load_sweep(QUICKSTART.parent / "sweeps" / "fg_weight_search.yaml")
    assert search.kinds == {"loss.pos_weight": "float", "optimizer.lr": "float"}
    assert search.config.pruning.pruner == "median" and not search.points


def test_compare_prints_runs_sorted_by_metric(tmp_path, capsys):
    # foreground everywhere vs nowhere
    path = write_sweep(tmp_path, {"trainer.threshold": [0.01, 0.99]})
    result = run_sweep(path, jobs=1, report=lambda line: None)
    assert main(["compare", "--runs", str(tmp_path / "runs"), "--sweep", result.sweep_id]) == 0
    out = capsys.readouterr().out
    assert "trainer.threshold" in out and "val/dice" in out
    high, low = sorted(result.rows, key=lambda row: -row["val/dice"])
    assert high["val/dice"] > low["val/dice"]
    assert out.index(high["run_id"][:8]) < out.index(low["run_id"][:8])


def test_interrupted_crosses_process_boundaries():
    original = Interrupted(signal.SIGTERM, "abc", "epoch 2, batch 3 of 9")
    again = pickle.loads(pickle.dumps(original))
    assert (again.signum, again.run_id, again.where) == (signal.SIGTERM, "abc",
                                                         "epoch 2, batch 3 of 9")


def test_changing_epochs_makes_new_children(tmp_path):
    short = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 2]})).points
    longer = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 2]},
                                    set={"trainer.epochs": 5})).points
    assert {p.config_hash for p in short}.isdisjoint(p.config_hash for p in longer)


@pytest.mark.parametrize("kind", ["grid", "search"])
def test_a_child_interrupted_mid_training_is_resumed_not_restarted(tmp_path, monkeypatch, kind):
    if kind == "grid":
        path = write_sweep(tmp_path, {"loss.pos_weight": [1, 2]})
    else:  # the interrupted trial's point is queued again, not replaced by a new sample
        path = write_sweep(tmp_path, None, search={
            "params": {"loss.pos_weight": {"low": 1, "high": 4}}, "sampler": "random",
            "trials": 2})
    original = runner.Trainer._optimizer_step
    steps = {"n": 0}

    # 2 children x 2 epochs x 2 batches: step 6 is child 2, epoch 1, batch 2
    def signal_in_second_child(self):
        original(self)
        steps["n"] += 1
        if steps["n"] == 6:
            self.stop.signum = signal.SIGTERM

    monkeypatch.setattr(runner.Trainer, "_optimizer_step", signal_in_second_child)
    with pytest.raises(Interrupted):
        run_sweep(path, jobs=1, report=lambda line: None)
    client, parents, children = runs(tmp_path)
    killed = [c for c in children if c.info.status == "KILLED"]
    assert len(killed) == 1 and parents[0].info.status == "KILLED"

    monkeypatch.setattr(runner.Trainer, "_optimizer_step", original)
    lines = []
    run_sweep(path, jobs=1, report=lines.append)
    client, parents, children = runs(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert killed[0].info.run_id in {c.info.run_id for c in children}  # the same run, continued
    assert any(f"resuming {killed[0].info.run_id}" in line for line in lines)
    assert [m.step for m in client.get_metric_history(killed[0].info.run_id, "val/dice")] == [1, 2]


def test_a_journal_file_is_a_storage_for_a_shared_filesystem(tmp_path):
    path = write_sweep(tmp_path, {"loss.pos_weight": [1, 2]})
    journal = tmp_path / "shared" / "study.log"
    result = run_sweep(path, storage=str(journal), report=lambda line: None)
    client, parents, children = runs(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name=result.sweep_id,
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    assert sorted(t.params["loss.pos_weight"] for t in study.trials) == [1, 2]


def test_search_with_pruning_stops_hopeless_children_which_end_finished_and_tagged(tmp_path):
    # threshold 0.999 predicts (almost) no foreground, 0.01 (almost) all: the 0.999 children fall
    # below the median of the finished ones, so the median rule prunes them once a 0.01 finished
    search = {"params": {"trainer.threshold": {"choices": [0.01, 0.999]},
                         "loss.pos_weight": {"low": 1, "high": 4, "log": True}},
              "sampler": "random", "seed": 3, "trials": 6}
    path = write_sweep(tmp_path, None, search=search, set={"trainer.epochs": 3},
                       prune={"pruner": "median", "startup_trials": 1, "warmup_epochs": 0})
    result = run_sweep(path, storage=f"sqlite:///{tmp_path}/study.db", report=lambda line: None)
    import optuna

    study = optuna.load_study(study_name=result.sweep_id, storage=f"sqlite:///{tmp_path}/study.db")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6
    assert "PRUNED" in states and "COMPLETE" in states
    client, parents, children = runs(tmp_path)
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    by_id = {c.info.run_id: c for c in children}
    for trial in study.trials:
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/dice")]
        assert child.data.tags["optuna_trial"] == str(trial.number)
        assert float(child.data.params["loss.pos_weight"]) == trial.params["loss.pos_weight"]
        if trial.state.name == "PRUNED":
            epoch = int(child.data.tags["pruned_at_epoch"])
            assert child.data.tags["pruned"] == "true" and steps == list(range(1, epoch + 1))
            assert epoch < 3 and trial.params["trainer.threshold"] == 0.999
            assert child.data.tags["stopped_early"] == "true"
        else:
            assert "pruned" not in child.data.tags and steps == [1, 2, 3]
            assert trial.value == child.data.metrics["val/dice"]
    # the summary: finished children first, by Dice; the pruned ones after them
    pruned = [row["pruned"] for row in result.rows]
    assert pruned == sorted(pruned) and len(result.rows) == 6
    assert result.best is not None and not result.best["pruned"]
    (parent,) = parents
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"summary.csv", "summary.json", "plots/optuna_history.png",
            "plots/optuna_importances.png", "plots/loss_pos_weight.png"} <= artifacts
    summary = client.download_artifacts(parent.info.run_id, "summary.json")
    table = json.loads(Path(summary).read_text())
    assert len(table["data"]) == 6 and "pruned" in table["columns"]


@pytest.mark.parametrize(("change", "field"), [
    ({"search": {"params": {"loss.pos_weight": {"low": 1, "high": 8}}, "sampler": "bayes",
                 "trials": 3}}, "search.sampler"),
    ({"search": {"params": {"loss.pos_weight": {"low": 4, "high": 4}}, "trials": 3}},
     "search.params.loss.pos_weight"),
    ({"search": {"params": {"loss.pos_weight": {"low": 8, "high": 1}}, "trials": 3}},
     "search.params.loss.pos_weight"),
    ({"search": {"params": {"loss.pos_weight": {"choices": []}}, "trials": 3}},
     "search.params.loss.pos_weight"),
    ({"search": {"params": {"loss.bogus": {"low": 1, "high": 8}}, "trials": 3}},
     "search.params.loss.bogus"),
    ({"search": {"params": {"model.depth": {"low": 2, "high": 9}}, "trials": 3}},
     "search.params.model.depth"),
    ({"grid": {"loss.bogus": [1, 2]}}, "grid point bogus=1"),
    ({"prune": "hyperband"}, "prune"),
], ids=["sampler", "empty-range", "low-above-high", "no-choices", "unknown-key", "invalid-end",
        "grid-unknown-key", "pruner"])
def test_a_bad_sweep_file_is_refused_before_any_run_naming_the_field(tmp_path, capsys, change,
                                                                      field):
    grid = change.pop("grid", None if "search" in change else {"loss.pos_weight": [1, 2]})
    path = write_sweep(tmp_path, grid, **change)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_range_takes_the_type_of_the_experiment_value(tmp_path):
    search = {"params": {"model.depth": {"low": 2, "high": 3},
                         "loss.pos_weight": {"low": 1, "high": 4}}, "trials": 1}
    plan = load_sweep(write_sweep(tmp_path, None, search=search))
    assert plan.kinds == {"model.depth": "int", "loss.pos_weight": "float"}
    bad = {"params": {"model.depth": {"low": 2, "high": 3.5}}, "trials": 1}
    with pytest.raises(ConfigError, match=r"search\.params\.model\.depth: .*whole numbers"):
        load_sweep(write_sweep(tmp_path, None, search=bad))


def test_a_grid_point_handed_out_twice_is_trained_once_even_before_its_params_exist(
        tmp_path, monkeypatch):
    # GridSampler hands a running point to a second worker once the grid is exhausted; the
    # first worker may not even have suggested its params yet: the grid id says it all
    from cityseg.engine.sweep import Duplicate, Worker, open_study

    plan = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 2]}))
    study = open_study(plan, f"sqlite:///{tmp_path}/study.db")
    first, second = study.ask(), study.ask()  # both points RUNNING, no params yet
    third = study.ask()  # the grid is exhausted: a duplicate of one of them
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("trained a duplicate"))
    with pytest.raises(Duplicate, match=r"trial [01] is training"):
        Worker(plan, study, parent_id="none", report=lambda line: None)(third)
    assert {first.number, second.number} == {0, 1}
