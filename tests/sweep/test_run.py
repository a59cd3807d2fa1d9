"""A sweep run: a parent with nested children, parallel jobs, skipping finished children,
summaries."""

import pytest

from cityseg import viz
from cityseg.cli import main
from cityseg.sweep import run_sweep
from tests.sweep.tiny import runs, write_sweep


@pytest.mark.slow  # about 28 s on two quiet cores: `make test-slow`
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


def test_compare_prints_runs_sorted_by_metric(tmp_path, capsys, monkeypatch):
    # foreground everywhere vs nowhere
    path = write_sweep(tmp_path, {"trainer.threshold": [0.01, 0.99]})
    headers = []
    real = viz.comparison_panel
    monkeypatch.setattr(viz, "comparison_panel", lambda images, targets, columns, task: (
        headers.extend(columns), real(images, targets, columns, task=task))[1])
    assert main(["sweep", str(path), "--set", "trainer.epochs=1"]) == 0  # --set: every child
    swept = capsys.readouterr().out
    # each child shows what a run shows: its epoch rows, under its line
    for child in ("threshold=0.01", "threshold=0.99"):
        rows = swept.split(f"{child}: training")[1].split(f"{child}: FINISHED")[0]
        assert [line.split()[0].rstrip("*") for line in rows.splitlines()
                if line.strip()[:1].isdigit()] == ["1/1"]
    (parent,) = runs(tmp_path)[1]
    result = run_sweep(path, jobs=1, report=lambda line: None,  # all done: a summary only
                       overrides=["trainer.epochs=1"])
    assert result.parent_id == parent.info.run_id
    assert main(["compare", "--runs", str(tmp_path / "runs"), "--sweep", result.sweep_id]) == 0
    out = capsys.readouterr().out
    assert "trainer.threshold" in out and "val/dice" in out
    high, low = sorted(result.rows, key=lambda row: -row["val/dice"])
    assert high["val/dice"] > low["val/dice"]
    # predictions_by_child.png: each column headed by its place and score, the best first
    assert headers[:2] == [f"#1 {high['child']} ({high['val/dice']:.3f})",
                           f"#2 {low['child']} ({low['val/dice']:.3f})"]
    assert out.index(high["run_id"][:8]) < out.index(low["run_id"][:8])
