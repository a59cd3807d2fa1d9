"""Training on several processes with torchrun (CPU, gloo): the same experiment, one MLflow run.

Every process group here is started by PyTorch's own launcher in a subprocess.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityseg.config import load_experiment
from cityseg.train import runner
from tests.conftest import QUICKSTART, only_run, steps, tiny_overrides

TORCHRUN = Path(sys.executable).with_name("torchrun")


def settings(tmp_path, epochs=3, extra=()):
    """Small but not trivial: 24 images, global batch 4, group norm, deterministic."""
    return [*tiny_overrides(tmp_path, epochs=epochs), "data.num_train=24", "data.num_val=6",
            "data.batch_size=4", "model.norm=group", "model.base_channels=8",
            "trainer.deterministic=true", "tracking.log_model=false", "loss.pos_weight=4",
            *extra]


def torchrun(nproc, overrides, *args, env=None):
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "cityseg",
               "run", str(QUICKSTART), *sum((["--set", o] for o in overrides), []), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_processes_train_like_one_in_a_single_mlflow_run(tmp_path):
    proc = torchrun(2, settings(tmp_path / "two"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("best val/dice") == 1  # rank 0 alone prints
    one = runner.run(load_experiment(QUICKSTART, settings(tmp_path / "one")))
    client, run = only_run(tmp_path / "two" / "runs")
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["backend"] == "gloo"
    assert run.data.tags["devices"] == "rank 0: cpu; rank 1: cpu"
    for key in ("train/loss", "val/loss", "val/dice", "val/iou", "throughput/img_s"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key
    assert one.metrics["val/dice"] > 0.05  # a model that finds something, not a trivial match
    assert run.data.metrics["val/dice"] == pytest.approx(one.metrics["val/dice"], abs=0.01)
    assert run.data.metrics["val/loss"] == pytest.approx(one.metrics["val/loss"], abs=0.01)
    # its epoch-end checkpoint goes on in one process
    longer = load_experiment(QUICKSTART, settings(tmp_path / "two", epochs=4))
    assert runner.run(longer, resume=run.info.run_id).resumed_from == 3
    assert steps(client, run.info.run_id, "val/dice") == [1, 2, 3, 4]


@pytest.mark.slow  # about 43 s on two quiet cores: `make test-slow`
def test_sigterm_to_torchrun_checkpoints_once_and_resume_finishes_the_same_run(tmp_path):
    overrides = settings(tmp_path, epochs=30)
    proc = torchrun(2, overrides)
    root = tmp_path / "runs"
    deadline = time.time() + 240
    while not list(root.glob("checkpoints/*/last.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "checkpoint saved" in out and "Traceback" not in out.split("torchrun")[0]
    client, run = only_run(root)
    assert run.info.status == "KILLED"
    done = steps(client, run.info.run_id, "val/dice")
    assert 1 <= len(done) < 30

    again = torchrun(2, overrides, "--resume", run.info.run_id)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    client, resumed = only_run(root)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val/dice") == list(range(1, 31))


SITECUSTOMIZE = '''
import os
if os.environ.get("RANK") == "1" and os.environ.get("CITYSEG_TEST_NAN_ON_RANK_1"):
    import torch
    from cityseg.infer.predictor import Predictor
    real = Predictor.logits
    calls = {"n": 0}

    def logits(self, x):
        out = real(self, x)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 3:
                return out * float("nan")
        return out

    Predictor.logits = logits
if os.environ.get("RANK") == "1" and os.environ.get("CITYSEG_TEST_BROKEN_DATA_ON_RANK_1"):
    from cityseg.data.datasets import SegmentationDataset
    from cityseg.errors import DataError
    real_item = SegmentationDataset.__getitem__
    items = {"n": 0}

    def getitem(self, key):
        if isinstance(key, tuple):  # training samples only
            items["n"] += 1
            if items["n"] >= 5:
                raise DataError("street_0042.png: truncated PNG")
        return real_item(self, key)

    SegmentationDataset.__getitem__ = getitem
'''


@pytest.mark.parametrize(("switch", "message"), [
    ("CITYSEG_TEST_NAN_ON_RANK_1", "NaN or infinite on rank 1 at epoch 1, step 3"),
    ("CITYSEG_TEST_BROKEN_DATA_ON_RANK_1",
     "rank 1 failed reading data: DataError: street_0042.png: truncated PNG"),
], ids=["nan", "broken-data"])
def test_a_failure_on_rank_1_fails_the_run_quickly_with_its_message(tmp_path, switch, message):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    start = time.time()
    proc = torchrun(2, settings(tmp_path, epochs=5), env={"PYTHONPATH": str(hooks), switch: "1"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and time.time() - start < 120
    assert message in out
    client, run = only_run(tmp_path / "runs")
    assert run.info.status == "FAILED" and message in run.data.tags["failure"]


UNAGREED_FAILURE = '''
import os
if os.environ.get("RANK") == "1":
    from cityseg.train.trainer import Trainer
    from cityseg.errors import DataError

    def fit(self, state=None):
        raise DataError("a failure only rank 1 knows about")

    Trainer.fit = fit
'''


def test_an_error_on_rank_1_outside_the_agreed_paths_reaches_stderr(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(UNAGREED_FAILURE)
    proc = torchrun(2, settings(tmp_path, epochs=2), env={"PYTHONPATH": str(hooks)})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank 1: a failure only rank 1 knows about" in out, out
