"""The sweep file: every point and range validated before anything runs, errors naming the field."""


import pytest

from cityseg.cli import main
from cityseg.errors import ConfigError
from cityseg.sweep import load_sweep
from tests.conftest import QUICKSTART
from tests.sweep.tiny import write_sweep


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


def test_changing_epochs_makes_new_children(tmp_path):
    short = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 2]})).points
    longer = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 2]},
                                    set={"trainer.epochs": 5})).points
    assert {p.config_hash for p in short}.isdisjoint(p.config_hash for p in longer)


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


def test_a_type_error_in_a_sweep_file_reads_like_an_experiment_error(tmp_path):
    # the same formatting as experiments: the file, the dotted field, the bad value, expected
    path = write_sweep(tmp_path, None, search={
        "params": {"loss.pos_weight": {"low": 1, "high": "lots"}}, "trials": "three"})
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: 2 errors")
    assert "search.params.loss.pos_weight.high: " in message and "'lots'" in message
    assert "search.trials: " in message and "'three'" in message


def test_set_on_the_command_line_joins_the_sweep_files_set_for_every_child(tmp_path):
    path = write_sweep(tmp_path, {"loss.pos_weight": [1, 2]}, set={"trainer.epochs": 3})
    plain = load_sweep(path)
    shrunk = load_sweep(path, ["trainer.epochs=1", "seed=5"])
    assert [p.experiment.trainer.epochs for p in plain.points] == [3, 3]
    assert [(p.experiment.trainer.epochs, p.experiment.seed) for p in shrunk.points] == [
        (1, 5), (1, 5)]
    assert [p.experiment.loss.pos_weight for p in shrunk.points] == [1, 2]
    assert shrunk.sweep_id != plain.sweep_id  # another sweep: its children are not mixed in
    with pytest.raises(ConfigError, match="tracking.dir"):
        load_sweep(path, [f"tracking.dir={tmp_path / 'elsewhere'}"])
