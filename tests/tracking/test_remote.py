"""Tracking anywhere: a real `mlflow server` on 127.0.0.1, used from three "machines" (three
tracking dirs that share nothing but the server), and training exactly as it does locally."""

import os
import shutil

import pytest
from mlflow import MlflowClient

from cityseg import tracking
from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.infer import loading
from cityseg.train import runner
from tests.conftest import QUICKSTART, mlflow_process, tiny_overrides


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An MLflow tracking server with a SQLite backend and its own artifact root."""
    root = tmp_path_factory.mktemp("server")
    with mlflow_process("server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
                        ready="/health") as url:
        yield url


def sets(overrides):
    return sum((["--set", o] for o in overrides), [])


def test_train_on_one_machine_resume_evaluate_and_predict_on_others(server, tmp_path, capsys):
    first = tiny_overrides(tmp_path / "a", epochs=1) + ["tracking.log_model=false"]
    assert main(["run", str(QUICKSTART), *sets(first), "--tracking-uri", server]) == 0
    assert f"{server}/#/experiments/" in capsys.readouterr().out
    assert not (tmp_path / "a" / "runs" / "mlflow.db").exists()  # nothing tracked locally
    client = MlflowClient(tracking_uri=server)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"

    # machine b: another tracking dir, no local checkpoint; last.pt comes from the server
    second = tiny_overrides(tmp_path / "b", epochs=2) + ["tracking.log_model=false"]
    assert main(["run", str(QUICKSTART), *sets(second), "--resume", run.info.run_id,
                 "--tracking-uri", server]) == 0
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice")] == [1, 2]

    # machine c: compare, evaluate, predict and re-run from the server alone
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    elsewhere = str(tmp_path / "c" / "runs")
    assert main(["compare", "--runs", elsewhere, "--tracking-uri", server]) == 0
    assert run.info.run_id[:8] in capsys.readouterr().out
    assert main(["evaluate", "--run", run.info.run_id, "--runs", elsewhere, "--no-log",
                 "--tracking-uri", server, "--set", f"data.root={tmp_path / 'a' / 'synthetic'}",
                 "--set", f"data.cache_dir={tmp_path / 'c' / 'cache'}"]) == 0
    image = tmp_path / "street.png"
    first_image = next((tmp_path / "a" / "synthetic").rglob("*_leftImg8bit.png"))
    image.write_bytes(first_image.read_bytes())
    assert main(["predict", "--run", run.info.run_id, "--runs", elsewhere, str(image),
                 "--out", str(tmp_path / "c" / "masks"), "--tracking-uri", server]) == 0
    assert (tmp_path / "c" / "masks" / "street_mask.png").is_file()
    assert main(["run", "--from-run", run.info.run_id, "--runs", elsewhere,
                 "--tracking-uri", server, "--set", f"tracking.dir={elsewhere}"]) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the flag does not leak into the caller


def test_a_server_tracked_run_trains_exactly_as_a_local_one(server, tmp_path):
    # the tracking backend must not change what is trained: same seed, same numbers, to the bit
    data = tiny_overrides(tmp_path, epochs=3) + ["tracking.log_model=false"]
    local = runner.run(load_experiment(QUICKSTART, [*data, f"tracking.dir={tmp_path / 'l'}"]))
    remote = runner.run(load_experiment(QUICKSTART, [*data, f"tracking.dir={tmp_path / 'r'}",
                                                     f"tracking.uri={server}"]))
    stores = {local.run_id: MlflowClient(tracking.tracking_uri(tmp_path / "l")),
              remote.run_id: MlflowClient(tracking_uri=server)}

    def per_epoch(run_id):
        client = stores[run_id]
        keys = [k for k in client.get_run(run_id).data.metrics
                if not k.startswith(("system/", "throughput/"))]
        return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k),
                                                      key=lambda m: m.step)] for k in keys}

    here, there = per_epoch(local.run_id), per_epoch(remote.run_id)
    assert "val/dice" in here and len(here["val/dice"]) == 3
    assert here == there


def test_a_yaml_tracking_uri_is_the_store_resume_and_loading_read_checkpoint_copies_from(
        server, tmp_path, capsys):
    """tracking.uri in the experiment file only (no MLFLOW_TRACKING_URI, no --tracking-uri):
    with the local checkpoints gone, resume and loading the trained run (as a sweep's summary
    does, handed the sweep's tracking.uri) find the run's copies in that server's artifacts."""
    experiment = tmp_path / "served.yaml"
    experiment.write_text(f"base: {QUICKSTART}\ntracking: {{uri: '{server}'}}\n")
    first = tiny_overrides(tmp_path, epochs=1) + ["tracking.log_model=false"]
    result = runner.run(load_experiment(experiment, first))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # tracked by the server alone
    shutil.rmtree(tmp_path / "runs" / "checkpoints")  # another machine, or a lost disk

    # the YAML's store is where the run, and its checkpoints' copies, are looked up
    code = main(["run", str(experiment), *sets([*first, "trainer.epochs=2"]),
                 "--resume", result.run_id])
    assert code == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=server)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.run_id, "val/dice")]
    assert steps == [1, 2]  # continued from the copy of epoch 1, not started again
    shutil.rmtree(tmp_path / "runs" / "checkpoints")
    trained = loading.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=tmp_path / "runs", uri=server)
    assert trained.run_id == result.run_id and trained.path.name == "best.pt"
