"""The epoch table a person sees: the task's own metrics, for every task."""

import io

import pytest
from rich.console import Console

from cityseg.train.display import RichDisplay


@pytest.mark.parametrize(("metrics", "shown", "absent"), [
    ({"val/dice": 0.81234, "val/iou": 0.7, "val/precision": 0.8, "val/recall": 0.9}, "0.8123",
     "miou"),
    ({"val/miou": 0.41234, "val/pixel_accuracy": 0.9}, "0.4123", "dice"),
], ids=["binary", "multiclass"])
def test_the_epoch_row_shows_the_metrics_the_task_logs(metrics, shown, absent):
    out = io.StringIO()
    display = RichDisplay(Console(file=out, width=120))
    display.epoch_start(1, 2, steps=3)
    display.epoch_end(1, {"train/loss": 0.5, "val/loss": 0.4, "lr": 1e-3,
                          "throughput/img_s": 12.5, **metrics}, best=True)
    text = out.getvalue()
    assert shown in text and "1/2*" in text and absent not in text
