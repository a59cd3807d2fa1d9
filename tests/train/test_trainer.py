"""Training itself, through the real quickstart shrunk: a diverging loss, early stopping with
gradient accumulation, every scheduler, fp16 with a gradient scaler and a compiled model."""

import pytest
import torch

from cityseg.checkpoints import load as load_checkpoint
from cityseg.config import load_experiment
from cityseg.errors import TrainingDiverged
from cityseg.losses import WeightedBCE
from cityseg.train import runner
from tests.conftest import NO_MODEL, QUICKSTART, runs_of, steps, tiny_overrides


def test_nan_loss_fails_the_run_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    # 2 batches an epoch
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=3), NO_MODEL])
    original = WeightedBCE.forward
    calls = {"n": 0}

    def poisoned(self, logits, target):
        calls["n"] += 1
        loss = original(self, logits, target)
        # epoch 2, batch 1 (after 2 + 1 val calls)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(WeightedBCE, "forward", poisoned)
    with pytest.raises(TrainingDiverged,
                       match=r"NaN or infinite at epoch 2, step 1 .*last good checkpoint"):
        runner.run(exp)
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.info.status == "FAILED" and "epoch 2, step 1" in run.data.tags["failure"]
    last = load_checkpoint(tmp_path / "runs" / "checkpoints" / run.info.run_id / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values()
                                      if t.is_floating_point())


def test_early_stopping_and_accumulation(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=6), NO_MODEL,
                                       "trainer.monitor=val/loss", "trainer.patience=1",
                                       "trainer.min_delta=100", "trainer.accumulate=2"])
    result = runner.run(exp)
    assert result.stopped_early and len(result.metrics) and result.best_epoch == 1
    client, (run,) = runs_of(tmp_path / "runs")
    assert steps(client, run.info.run_id) == [1, 2] and run.data.tags["stopped_early"] == "true"
    last = load_checkpoint(result.checkpoints["last"])
    # 2 batches an epoch, 2 per optimizer step, 2 epochs
    assert last["scheduler"]["last_epoch"] == 2


@pytest.mark.parametrize("scheduler", ["step", "plateau", "none"])
def test_every_scheduler_trains(tmp_path, scheduler):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2), NO_MODEL,
                                       f"scheduler={{name: {scheduler}}}"])
    assert runner.run(exp).metrics["lr"] > 0


def test_fp16_trains_with_a_gradient_scaler(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=1), NO_MODEL,
                                       "trainer.precision=fp16"])
    result = runner.run(exp)
    assert "scale" in load_checkpoint(result.checkpoints["last"])["scaler"]


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_plain_weights(tmp_path):
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=1), NO_MODEL,
                                       "trainer.compile=true"])
    result = runner.run(exp)
    keys = load_checkpoint(result.checkpoints["last"])["model"]
    assert not any(k.startswith("_orig_mod") for k in keys)
