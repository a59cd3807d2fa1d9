"""Interruption and resume: a signal, mid-epoch, with a changed config or another architecture,
with as many processes as a mid-epoch checkpoint needs, and from checkpoints and hashes of an
earlier cityseg."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from cityseg.checkpoints import load as load_checkpoint
from cityseg.checkpoints import save_atomic
from cityseg.cli import main
from cityseg.config import (
    Experiment,
    TrainerConfig,
    config_hash,
    identity,
    legacy_config_hash,
    load_experiment,
)
from cityseg.errors import ConfigError, Interrupted
from cityseg.models.unet import UNet
from cityseg.tracking import tracking_uri
from cityseg.train import runner
from cityseg.train.display import NullDisplay
from cityseg.train.resume import ResumePoint, check_same_world
from tests.conftest import NO_MODEL, QUICKSTART, runs_of, steps, tiny_overrides


def test_sigterm_checkpoints_marks_killed_and_resume_finishes_without_duplicate_steps(tmp_path):
    overrides = [*tiny_overrides(tmp_path, epochs=40), NO_MODEL]
    args = [sys.executable, "-m", "cityseg.cli", "run", str(QUICKSTART)]
    for override in overrides:
        args += ["--set", override]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "runs" / "checkpoints"
    deadline = time.time() + 120
    while (not list(checkpoints.glob("*/last.pt")) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.2)  # wait for the first epoch's checkpoint
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "resume with: cityseg run" in err
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.info.status == "KILLED"
    done = steps(client, run.info.run_id)
    assert 1 <= len(done) < 40

    code = main(["run", str(QUICKSTART), *sum((["--set", o] for o in overrides), []),
                 "--resume", run.info.run_id])
    assert code == 0
    client, (again,) = runs_of(tmp_path / "runs")  # the same run, continued
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert steps(client, run.info.run_id) == list(range(1, 41))  # every epoch once
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, 41))


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_interrupted_mid_epoch_resume_equals_an_uninterrupted_run(tmp_path, augment_on):
    def experiment(folder, epochs=2):
        return load_experiment(QUICKSTART, [*tiny_overrides(tmp_path / folder, epochs=epochs),
                                            NO_MODEL, "data.batch_size=2", "data.num_train=8",
                                            "trainer.deterministic=true",
                                            f"data.augment_on={augment_on}"])

    straight = runner.run(experiment("a"))
    # the same experiment, stopped by a signal after batch 2 of epoch 2, then resumed
    exp = experiment("b")
    original = runner.Trainer._optimizer_step
    calls = {"n": 0}

    def signal_after_six_steps(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 1 has 4 batches: this is batch 2 of epoch 2
            self.stop.signum = signal.SIGTERM

    runner.Trainer._optimizer_step = signal_after_six_steps
    try:
        with pytest.raises(Interrupted) as info:
            runner.run(exp)
    finally:
        runner.Trainer._optimizer_step = original
    checkpoint = load_checkpoint(
        tmp_path / "b" / "runs" / "checkpoints" / info.value.run_id / "last.pt")
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["step_in_epoch"]) == (2, 2)
    # stopped inside epoch 2: one epoch is not enough to continue
    fewer = experiment("b", epochs=1)
    with pytest.raises(ConfigError, match=r"already trained 1 epochs and 2 batches of epoch 2; "
                                          r"set trainer.epochs to at least 2"):
        runner.run(fewer, resume=info.value.run_id)
    resumed = runner.run(exp, resume=info.value.run_id)
    assert resumed.resumed_from == 1
    without_speed = [{k: v for k, v in m.items() if k != "throughput/img_s"}
                     for m in (resumed.metrics, straight.metrics)]
    assert without_speed[0] == pytest.approx(without_speed[1], rel=1e-6, abs=1e-9)


def test_resume_with_a_changed_config_is_refused(tmp_path, capsys):
    overrides = [*tiny_overrides(tmp_path, epochs=1), NO_MODEL]
    result = runner.run(load_experiment(QUICKSTART, overrides))
    changed = load_experiment(QUICKSTART, [*overrides, "optimizer.lr=0.5", "trainer.epochs=2"])
    with pytest.raises(ConfigError, match=r"cannot resume.*\n  optimizer\.lr: "
                                          r"0\.003 in the checkpoint, 0\.5 now"):
        runner.run(changed, resume=result.run_id)
    args = ["run", str(QUICKSTART), *sum((["--set", o] for o in [*overrides, "model.depth=3"]), []),
            "--resume", str(result.checkpoints["last"])]
    assert main(args) == 2
    assert "model.depth: 2 in the checkpoint, 3 now" in capsys.readouterr().err
    more = runner.run(load_experiment(QUICKSTART, [*overrides, "trainer.epochs=2"]), resume="auto")
    assert more.run_id == result.run_id or more.resumed_from == 0  # auto: only unfinished runs
    client, runs = runs_of(tmp_path / "runs")
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_mid_epoch_checkpoint_resumes_only_with_as_many_processes():
    def point(step, world):
        return ResumePoint(Path("last.pt"), {"state": {"epoch": 2, "step_in_epoch": step,
                                                       "world_size": world}})

    check_same_world(point(0, 2), 1)  # an epoch's end: any number
    check_same_world(point(3, 2), 2)
    with pytest.raises(ConfigError,
                       match=r"at batch 3 of epoch 2, with 2 process\(es\); resume it with 2"):
        check_same_world(point(3, 2), 1)


def test_no_run_is_left_running(tmp_path):
    os.environ.pop("MLFLOW_RUN_ID", None)
    for root in tmp_path.parent.glob("*/runs"):
        if (root / "mlflow.db").exists():
            client = MlflowClient(tracking_uri=tracking_uri(root))
            for experiment in client.search_experiments():
                assert not client.search_runs([experiment.experiment_id],
                                              "attributes.status = 'RUNNING'")


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=1), NO_MODEL])
    result = runner.run(exp)
    checkpoint = load_checkpoint(result.checkpoints["last"])
    checkpoint["model"] = UNet(in_channels=3, out_channels=1, depth=1, base_channels=2, norm="none",
                               upsample="bilinear", dropout=0.0).state_dict()
    broken = tmp_path / "other.pt"
    torch.save(checkpoint, broken)
    with pytest.raises(ConfigError,
                       match="other.pt: the checkpoint's weights do not fit this model"):
        longer = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2), NO_MODEL])
        runner.run(longer, resume=str(broken))
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.info.status == "FINISHED"  # the refused resume did not reopen the run


def test_a_checkpoint_saved_before_new_config_keys_existed_still_resumes(tmp_path):
    overrides = [*tiny_overrides(tmp_path, epochs=1), NO_MODEL]
    result = runner.run(load_experiment(QUICKSTART, overrides))
    path = result.checkpoints["last"]
    saved = load_checkpoint(path)
    # as an older cityseg wrote it: no keys that came later (their defaults are what it did)
    for section, key in (("trainer", "inference"), ("data", "scale"), ("data", "augment_on"),
                         ("model", "encoder"), ("model", "weights")):
        del saved["config"][section][key]
    save_atomic(saved, path)
    said = []
    shown = NullDisplay()
    shown.message = said.append
    more = runner.run(load_experiment(QUICKSTART, [*overrides, "trainer.epochs=2"]),
                      resume=result.run_id[:8], display=shown)  # the id's start, as printed
    assert more.run_id == result.run_id and more.resumed_from == 1
    # said at the start: which run, from where
    assert f"resuming run {result.run_id} from the end of epoch 1 ({path})" in said
    with pytest.raises(ConfigError, match=r"trainer\.inference\.mode: whole in the checkpoint, "
                                          r"slide now"):
        runner.run(load_experiment(QUICKSTART, [*overrides, "trainer.epochs=3",
                                                "trainer.inference.mode=slide"]),
                   resume=result.run_id)


class _UpgradedTrainer(TrainerConfig):
    """The trainer section of a later cityseg that has one more key, with a default."""

    warmup_grace: int = 3


class _Upgraded(Experiment):
    trainer: _UpgradedTrainer = _UpgradedTrainer()
    export_format: str = "onnx"


def test_an_upgrade_that_adds_keys_with_defaults_keeps_the_hash_and_resume_auto(
        tmp_path, monkeypatch):
    overrides = [*tiny_overrides(tmp_path, epochs=1), NO_MODEL]
    today = load_experiment(QUICKSTART, overrides)
    upgraded = _Upgraded.model_validate(today.model_dump(mode="json"))
    assert "warmup_grace" in upgraded.model_dump()["trainer"]
    assert config_hash(upgraded) == config_hash(today)
    assert config_hash(upgraded, resumable=False) == config_hash(today, resumable=False)
    # a value that differs from its default still counts, and so does the component's name
    assert config_hash(today.model_copy(update={"seed": 7})) != config_hash(today)
    dice = load_experiment(QUICKSTART, [*overrides, "loss.name=dice"])
    assert config_hash(dice) != config_hash(today)

    first = runner.run(today)
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.data.tags["config_hash"] == config_hash(today)
    client.set_terminated(first.run_id, status="KILLED")  # interrupted: resumable
    # the schema as the upgrade reads it: the saved config gains the new keys' defaults
    monkeypatch.setattr(identity, "Experiment", _Upgraded)
    longer = _Upgraded.model_validate(
        load_experiment(QUICKSTART, [*overrides, "trainer.epochs=2"]).model_dump(mode="json"))
    again = runner.run(longer, resume="auto")
    assert again.run_id == first.run_id and again.resumed_from == 1


def test_resume_auto_finds_a_run_tagged_with_the_hash_of_earlier_cityseg(tmp_path):
    overrides = [*tiny_overrides(tmp_path, epochs=1), NO_MODEL]
    exp = load_experiment(QUICKSTART, overrides)
    first = runner.run(exp)
    client, _ = runs_of(tmp_path / "runs")
    client.set_tag(first.run_id, "config_hash", legacy_config_hash(exp))
    client.set_terminated(first.run_id, status="KILLED")
    assert legacy_config_hash(exp) != config_hash(exp)
    again = runner.run(load_experiment(QUICKSTART, [*overrides, "trainer.epochs=2"]),
                       resume="auto")
    assert again.run_id == first.run_id and again.resumed_from == 1
