"""The Optuna study: storages (a journal file), search and pruning."""

import json
from pathlib import Path

from cityseg.sweep import run_sweep
from tests.sweep.tiny import runs, write_sweep


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
    # every column holds a value in each row, under a name the UI renders (no dots: the UI
    # reads them as paths); the swept key still reads as itself
    assert "loss/pos_weight" in table["columns"]
    assert not [c for c in table["columns"] if "." in c]
    for row in table["data"]:
        assert len(row) == len(table["columns"])
        assert all(value not in ("", None) for name, value in zip(table["columns"], row,
                                                                 strict=True) if name != "trial")
