"""The fixed validation samples as MLflow's step-indexed images: one key per sample, step 0
the untrained model, then one step per epoch, in every run (a sweep's children too); read back
through MlflowClient."""

import inspect

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cityseg.config import load_experiment
from cityseg.engine import runner
from cityseg.sweep import run_sweep
from cityseg.tracking import records, tracking_uri
from cityseg.tracking.outage import Outage
from cityseg.tracking.outbox import Outbox, unspooled
from tests.conftest import QUICKSTART, tiny_overrides
from tests.sweep.tiny import runs, write_sweep

KEYS = ("val/sample_0", "val/sample_1")  # tiny_overrides: tracking.num_samples=2
NO_MODEL = "tracking.log_model=false"


def step_images(client: MlflowClient, run_id: str) -> dict[tuple[str, int], list[str]]:
    """(key, step) -> what MlflowClient.log_image(key=, step=) wrote for it, as the UI reads
    it: images/<key, '/' as '~'>+step+<step>+timestamp+<ms>+<uuid>.png and a
    <same>+compressed.webp thumbnail beside it (MLflow has no call that lists them)."""
    found: dict[tuple[str, int], list[str]] = {}
    for info in client.list_artifacts(run_id, "images"):
        key, step_word, step, time_word, _ms, rest = info.path.removeprefix("images/").split(
            "+", 5)
        assert (step_word, time_word) == ("step", "timestamp"), info.path
        kind = "thumbnail" if rest.endswith("+compressed.webp") else "image"
        found.setdefault((key.replace("~", "/"), int(step)), []).append(kind)
    return found


def every_key_once(steps) -> dict[tuple[str, int], list[str]]:
    return {(key, step): ["image", "thumbnail"] for key in KEYS for step in steps}


def test_each_sample_is_an_image_at_step_zero_and_every_epoch_and_resuming_goes_on(tmp_path):
    overrides = [*tiny_overrides(tmp_path, epochs=2), NO_MODEL]
    result = runner.run(load_experiment(QUICKSTART, overrides))
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    found = step_images(client, result.run_id)
    assert {k: sorted(v) for k, v in found.items()} == every_key_once((0, 1, 2))
    assert client.get_run(result.run_id).data.tags["mlflow.loggedImages"] == "True"
    images = {i.path for i in client.list_artifacts(result.run_id, "images")}
    card = next(p for p in sorted(images) if p.endswith(".png"))
    with Image.open(client.download_artifacts(result.run_id, card, str(tmp_path))) as image:
        assert image.mode == "RGB" and image.height * 2 > image.width  # one sample, not a strip
    thumb = next(p for p in sorted(images) if p.endswith(".webp"))
    with Image.open(client.download_artifacts(result.run_id, thumb, str(tmp_path))) as image:
        assert max(image.size) == 256
    panels = [a.path for a in client.list_artifacts(result.run_id, "samples")]
    assert panels == ["samples/epoch_001.png", "samples/epoch_002.png"]  # full size, as before

    # the same run, trained on: its untrained picture is not taken again
    more = runner.run(load_experiment(QUICKSTART, [*overrides, "trainer.epochs=3"]),
                      resume=result.run_id)
    assert more.run_id == result.run_id and more.resumed_from == 2
    found = step_images(client, result.run_id)
    assert {k: sorted(v) for k, v in found.items()} == every_key_once((0, 1, 2, 3))


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


@pytest.mark.slow  # a two-child sweep: about 40 s on two cores
def test_sweep_children_log_the_same_sample_keys(tmp_path):
    run_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 4]}), report=lambda line: None)
    client, parents, children = runs(tmp_path)
    assert len(children) == 2
    for child in children:
        found = step_images(client, child.info.run_id)
        assert {k: sorted(v) for k, v in found.items()} == every_key_once((0, 1, 2))
