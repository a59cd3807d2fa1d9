import subprocess
import sys

from cityseg.cli import main
from tests.conftest import EXPERIMENTS, QUICKSTART


def test_validate_accepts_every_experiment(capsys):
    assert main(["validate", *map(str, EXPERIMENTS)]) == 0
    assert capsys.readouterr().out.count(": ok") == len(EXPERIMENTS)


def test_validate_bad_file_exits_2_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndata: {name: synthetic}\nmodel: {name: unet, dept: 3}\n")
    assert main(["validate", str(QUICKSTART), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "model.dept: unknown key (did you mean depth?)" in err


def test_cli_errors_have_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndata: {name: synthetic}\nloss: {name: focal_typo}\n")
    proc = subprocess.run([sys.executable, "-m", "cityseg.cli", "validate", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "loss.name: unknown loss 'focal_typo'" in proc.stderr


def test_run_with_invalid_config_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["run", str(QUICKSTART), "--set", f"tracking.dir={runs}", "--set", "trainer.epochs=-2"])
    assert code == 2
    assert "trainer.epochs" in capsys.readouterr().err
    assert not runs.exists()


def test_run_without_cityscapes_says_where_to_put_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["run", str(QUICKSTART.parent / "baseline.yaml"), "--set", f"data.root={tmp_path / 'none'}",
                 "--set", f"tracking.dir={runs}"])
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


def test_readme_documents_every_registered_component():
    from cityseg.config import REGISTRY_FIELDS
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    missing = [f"{field}: {name}" for field, registry in REGISTRY_FIELDS.items()
               for name in registry.names() if f"`{name}`" not in readme]
    assert not missing, f"README's Components table lacks {missing}"
