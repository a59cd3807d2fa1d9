"""A record kept through an outage is delivered to MLflow as it was taken."""

import inspect

import numpy as np
from mlflow import MlflowClient

from cityseg.tracking import records
from cityseg.tracking.outage import Outage
from cityseg.tracking.outbox import Outbox, unspooled


class Client:
    """Takes log_image calls, checked against MlflowClient's own signature."""

    def __init__(self) -> None:
        self.calls = []

    def log_image(self, *args, **kwargs):
        inspect.signature(MlflowClient.log_image).bind(self, *args, **kwargs)
        self.calls.append((args, kwargs))


def test_a_step_image_kept_through_an_outage_is_sent_later_as_it_was(tmp_path):
    """A record kept while the server was silent goes to disk for --resume, and is sent with
    its key, its step and the time it was taken."""
    card = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    box = Outbox(deliver=print, probe=print, outage=Outage("http://127.0.0.1:1", 60))
    box.put_kept(("step_image", card, "val/sample_1", 3, 1234))
    assert box.spool(tmp_path / "unsent") == 1
    (record,) = unspooled(tmp_path / "unsent")
    client = Client()
    records.deliver(record, client, "run", artifacts=tmp_path)
    ((args, kwargs),) = client.calls
    assert args[0] == "run" and np.array_equal(args[1], card)
    assert kwargs == {"key": "val/sample_1", "step": 3, "timestamp": 1234, "synchronous": True}
