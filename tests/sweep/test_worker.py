"""A worker: interrupted children resumed, finished points never trained twice."""

import pickle
import signal

import pytest

from cityseg.errors import Interrupted
from cityseg.sweep import load_sweep, run_sweep
from cityseg.train import runner
from tests.sweep.tiny import runs, write_sweep


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
    # the interrupted point went back into the queue: every point of the grid done once, in
    # the file's order
    import optuna

    study = optuna.load_study(study_name=parents[0].data.tags["sweep_id"],
                              storage=f"sqlite:///{tmp_path}/runs/optuna.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert [t.params["loss.pos_weight"] for t in complete] == [1, 2, 4]


def test_interrupted_crosses_process_boundaries():
    original = Interrupted(signal.SIGTERM, "abc", "epoch 2, batch 3 of 9")
    again = pickle.loads(pickle.dumps(original))
    assert (again.signum, again.run_id, again.where) == (signal.SIGTERM, "abc",
                                                         "epoch 2, batch 3 of 9")


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


def test_a_grid_point_handed_out_twice_is_trained_once_even_before_its_params_exist(
        tmp_path, monkeypatch):
    # GridSampler hands a running point to a second worker once the grid is exhausted; the
    # first worker may not even have suggested its params yet: the grid id says it all
    from cityseg.sweep import Duplicate, Worker, open_study, open_tracker

    plan = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 2]}))
    study = open_study(plan, f"sqlite:///{tmp_path}/study.db")
    first, second = study.ask(), study.ask()  # both points RUNNING, no params yet
    third = study.ask()  # the grid is exhausted: a duplicate of one of them
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("trained a duplicate"))
    with pytest.raises(Duplicate, match=r"trial [01] is training"):
        Worker(plan, study, tracker=open_tracker(plan), parent_id="none",
               report=lambda line: None)(third)
    assert {first.number, second.number} == {0, 1}


def test_a_grid_is_trained_in_the_files_order(tmp_path, monkeypatch):
    # Optuna's GridSampler alone draws the points shuffled
    from cityseg.sweep import Worker, open_study, open_tracker

    weights = [16, 1, 4, 2, 8]
    plan = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": weights}))
    tried = []

    def child(exp, **kwargs):
        tried.append(exp.loss.pos_weight)
        raise RuntimeError("not trained here")

    monkeypatch.setattr(runner, "run", child)
    worker = Worker(plan, open_study(plan, f"sqlite:///{tmp_path}/study.db"),
                    tracker=open_tracker(plan), parent_id="none", report=lambda line: None)
    failed = worker.work()
    assert tried == weights and len(failed) == len(weights)
