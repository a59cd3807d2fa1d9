import subprocess
import sys

from mlflow.entities import Metric, Param

from cityseg import tracking
from cityseg.cli import main
from cityseg.registry import LOSSES
from tests.conftest import EXPERIMENTS, NO_MODEL, QUICKSTART, runs_of, tiny_overrides


def test_validate_accepts_every_experiment(capsys):
    assert main(["validate", *map(str, EXPERIMENTS)]) == 0
    assert capsys.readouterr().out.count(": ok") == len(EXPERIMENTS)


def test_validate_accepts_the_sweep_files_and_names_a_broken_ones_field(tmp_path, capsys):
    sweeps = sorted((QUICKSTART.parent / "sweeps").glob("*.yaml"))
    assert sweeps and main(["validate", *map(str, sweeps)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (sweep ") == len(sweeps) and "5 children, ranked by val/dice, max" in out
    # a broken child (a grid value out of range), a typo in the sweep file, a loss ranked
    # (mode: min without being told)
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"name: b\nbase: {QUICKSTART}\ngrid: {{loss.pos_weight: [1, -2]}}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"name: t\nbase: {QUICKSTART}\ngrid: {{loss.pos_weight: [1]}}\nmetrik: x\n")
    loss = tmp_path / "loss.yaml"
    loss.write_text(f"name: l\nbase: {QUICKSTART}\ngrid: {{loss.pos_weight: [1]}}\n"
                    f"metric: val/loss\n")
    assert main(["validate", str(broken), str(typo), str(loss)]) == 2
    captured = capsys.readouterr()
    assert f"{broken}" in captured.err and "loss.pos_weight" in captured.err
    assert f"{typo}" in captured.err and "metrik: unknown key (did you mean metric?)" in \
        captured.err
    assert "ranked by val/loss, min" in captured.out
    assert main(["validate", str(loss), "--set", "trainer.epochs=1"]) == 2
    assert "a sweep file takes no --set" in capsys.readouterr().err


def test_validate_bad_file_exits_2_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndata: {name: synthetic}\nmodel: {name: unet, dept: 3}\n")
    assert main(["validate", str(QUICKSTART), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "model.dept: unknown key (did you mean depth?)" in err


OK = "name: t\ndata: {name: synthetic, image_size: [32, 64]}\n"
BAD_FILES = {  # file name -> (content, expected message)
    "key.yaml": (OK + "model: {name: unet, base_chanels: 8}\n",
                 "model.base_chanels: unknown key (did you mean base_channels?)"),
    "type.yaml": (OK + "trainer: {epochs: three}\n",
                  "trainer.epochs: Input should be a valid integer"),
    "range.yaml": (OK + "optimizer: {lr: -1}\n", "optimizer.lr: Input should be greater than 0"),
    "depth.yaml": (OK + "model: {name: unet, depth: 6}\n",
                   "must be divisible by 2**model.depth = 64"),
    "component.yaml": (OK + "loss: {name: focal_typo}\n", "loss.name: unknown loss 'focal_typo'"),
    "syntax.yaml": ("name: t\ndata: [unclosed\n", "YAML syntax error at line 3, column 1"),
    "empty.yaml": ("", "file is empty"),
    "list.yaml": ("- 1\n", "top level must be a mapping"),
    "noname.yaml": (OK + "loss: {pos_weight: 2}\n",
                    "loss.name: missing; choose one of " + ", ".join(LOSSES.names())),
    "base.yaml": ("base: nowhere.yaml\n" + OK, "nowhere.yaml: base file (included by"),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cityseg.cli", *args], capture_output=True,
                          text=True)


def test_every_config_error_kind_exits_2_without_traceback(tmp_path):
    paths = []
    for name, (content, _) in BAD_FILES.items():
        (tmp_path / name).write_text(content)
        paths.append(str(tmp_path / name))
    proc = cli("validate", *paths, str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for name, (_, expected) in BAD_FILES.items():
        assert str(tmp_path / name) in proc.stderr and expected in proc.stderr, name
    assert "missing.yaml: experiment file not found" in proc.stderr


def test_bad_override_exits_2_without_traceback(tmp_path):
    proc = cli("run", str(QUICKSTART), "--set", "trainer.epochz=1",
               "--set", f"tracking.dir={tmp_path}/r")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "trainer.epochz: unknown key (did you mean epochs?)" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_run_with_invalid_config_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["run", str(QUICKSTART), "--set", f"tracking.dir={runs}",
                 "--set", "trainer.epochs=-2"])
    assert code == 2
    assert "trainer.epochs" in capsys.readouterr().err
    assert not runs.exists()


def test_run_without_cityscapes_says_where_to_put_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["run", str(QUICKSTART.parent / "baseline.yaml"),
                 "--set", f"data.root={tmp_path / 'none'}", "--set", f"tracking.dir={runs}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Cityscapes not found" in err and "gtFine" in err and "cityscapes-dataset.com" in err
    assert not runs.exists()


def test_show_prints_resolved_yaml_with_overrides(capsys):
    assert main(["show", str(QUICKSTART), "--set", "trainer.epochs=2"]) == 0
    assert "epochs: 2" in capsys.readouterr().out


def test_schema_and_list(capsys):
    assert main(["schema"]) == 0
    assert '"base_channels"' in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "weighted_bce" in capsys.readouterr().out


def test_the_docs_components_table_matches_the_schema():
    """Every registered component has a row in docs/experiments.md's table naming each of its
    params."""
    from cityseg.config import REGISTRY_FIELDS, TrackingConfig, TrainerConfig
    from cityseg.data.datasets import DataParams
    from tests.conftest import REPO

    rows = {}
    for line in (REPO / "docs" / "experiments.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 5 and cells[1]:
            rows[(cells[1].split()[0], cells[2].strip("`"))] = cells[3]
    expected = {(field, name): [f for f in registry.get(name).params.model_fields if f != "name"]
                for field, registry in REGISTRY_FIELDS.items() for name in registry.names()}
    shared = list(DataParams.model_fields)
    expected.update({("data", ""): shared, ("trainer", ""): list(TrainerConfig.model_fields),
                     ("tracking", ""): list(TrackingConfig.model_fields)})
    problems = []
    for key, fields in expected.items():
        row = rows.get(key)
        if row is None:
            problems.append(f"no row for {key}")
            continue
        own = [f for f in fields if not (key[0] == "data" and key[1] and f in shared)]
        problems += [f"{key}: {f}" for f in own if f not in row]
    assert not problems, problems


def test_evaluate_refuses_write_threshold_before_loading_a_model(tmp_path, capsys):
    """Neither checkpoint exists: the --write-threshold problem is found first."""
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--write-threshold"]) == 2
    assert "--write-threshold needs --calibrate" in capsys.readouterr().err
    assert main(["evaluate", "--run", "0123abcd", "--runs", str(tmp_path / "runs"),
                 "--calibrate", "--write-threshold"]) == 2
    assert "--write-threshold needs a local checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_from_run_reruns_the_logged_config(tmp_path, capsys):
    overrides = [*tiny_overrides(tmp_path, epochs=1), NO_MODEL]
    assert main(["run", str(QUICKSTART), *(a for o in overrides for a in ("--set", o))]) == 0
    # the first run says what the pause while MLflow makes its tables is
    assert f"tracking: creating the MLflow store {tmp_path / 'runs' / 'mlflow.db'}" in \
        capsys.readouterr().out.replace("\n", "")
    _, (first,) = runs_of(tmp_path / "runs")
    first = first.info
    assert main(["run", "--from-run", first.run_id[:8], "--runs", str(tmp_path / "runs"),
                 "--set", "seed=7"]) == 0
    client, runs = runs_of(tmp_path / "runs")
    assert len(runs) == 2
    second = next(r for r in runs if r.info.run_id != first.run_id)
    assert second.data.params["seed"] == "7" and second.data.params["model.depth"] == "2"
    assert main(["run", "--from-run", "nope", "--runs", str(tmp_path / "runs")]) == 2
    assert "run 'nope' not found" in capsys.readouterr().err


def test_compare_fits_the_terminal_with_names_and_the_ranking_metric_whole(tmp_path, capsys,
                                                                           monkeypatch):
    tracker = tracking.open(tmp_path, experiment="e")
    long_path = "/data/" + "very-long-folder-name/" * 4
    for i, weight in enumerate((1, 4, 16)):
        run_id = tracker.create_run(run_name=f"fg_weight-loss.pos_weight_{weight}-seed_{i}",
                                    tags={})
        tracker.store.client.log_batch(run_id, metrics=[
            Metric("val/dice", 0.5 + i / 10, 0, 1), Metric("val/iou", 0.3 + i / 10, 0, 1)],
            params=[Param("loss.pos_weight", str(weight)), Param("data.root", f"{long_path}{i}"),
                    Param("optimizer.group.model", f"482737 parameters, lr 0.000{i}, ...")] + [
                Param("seed", str(i)), *(Param(f"trainer.knob_{k}", str(k)) for k in range(9))])
        tracker.store.client.set_terminated(run_id, "FINISHED")
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["compare", "--runs", str(tmp_path), "--experiment", "e"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100
    header = next(line for line in lines if line.startswith("run "))
    assert header.split()[:3] == ["run", "val/dice", "val/iou"]
    names = [line.split()[0] for line in lines if line.startswith("fg_weight")]
    assert names == [f"fg_weight-loss.pos_weight_{w}-seed_{i}" for i, w in ((2, 16), (1, 4),
                                                                              (0, 1))]
    # the params that differ, short ones first, as far as they fit; never the optimizer's groups
    assert header.split()[-2:] == ["seed", "loss.pos_weight"] and "trainer.knob" not in out
    assert "optimizer.group" not in out
    assert "1 more differing setting(s) left out to fit 100 columns: data.root" in out


def test_compare_shows_settings_that_differ_in_the_logged_configs(tmp_path, capsys):
    """A run logs a few params; what else differs comes from each run's config.yaml."""
    tracker = tracking.open(tmp_path, experiment="e")
    for channels in (8, 16):
        run_id = tracker.create_run(run_name=f"c{channels}", tags={})
        client = tracker.store.client
        client.log_batch(run_id, metrics=[Metric("val/dice", channels / 100, 0, 1)],
                         params=[Param("seed", "1")])
        client.log_text(run_id, f"model:\n  name: unet\n  base_channels: {channels}\n",
                        "config.yaml")
        client.set_terminated(run_id, "FINISHED")
    assert main(["compare", "--runs", str(tmp_path), "--experiment", "e"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert header.split()[-1] == "model.base_channels" and "seed" not in header
    assert [line.split()[-1] for line in lines if line.startswith("c")] == ["16", "8"]
