"""What a run logs, as records: ("metrics", {key: value}, step, ms), ("params", {...}),
("tags", {...}), ("delete_tag", key), ("datasets", [[context, description], ...]),
("table" | "image" | "text", content, artifact_file), ("step_image", image, key, step, ms)
and ("file", path, artifact_path).

A record is plain data (an image is an array), so that an outage can keep it, in memory and
on disk, and send it later exactly as it would have been sent (metrics with their own time).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from cityseg.errors import StorageError

Record = tuple  # (kind, *payload)
IMAGES = ("image", "step_image")  # the kinds whose payload starts with an array
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


def deliver(record: Record, client, run_id: str, *, artifacts: Path) -> None:
    """Send `record` of run `run_id` through `client` (one that retries, or tries once); an
    artifact that cannot be written is a StorageError naming it (and `artifacts`)."""
    kind, *payload = record
    if kind == "metrics":
        values, step, now = payload
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
    elif kind == "params":
        items = [Param(k, v) for k, v in payload[0].items()]
        for i in range(0, len(items), _BATCH):
            client.log_batch(run_id, params=items[i : i + _BATCH])
    elif kind == "tags":
        for key, value in payload[0].items():
            client.set_tag(run_id, key, value)
    elif kind == "delete_tag":
        client.delete_tag(run_id, payload[0])
    elif kind == "datasets":
        client.log_inputs(run_id, datasets=_dataset_inputs(payload[0]))
    elif kind == "step_image":
        image, key, step, now = payload
        with _artifact(f"images/{key} (step {step})", run_id, artifacts):
            client.log_image(run_id, image, key=key, step=step, timestamp=now, synchronous=True)
    elif kind == "file":
        path, folder = payload
        with _artifact(f"{folder}/{Path(path).name}", run_id, artifacts):
            client.log_artifact(run_id, path, folder)
    else:
        content, name = payload
        with _artifact(name, run_id, artifacts):
            if kind == "table":
                client.log_table(run_id, content, name)
            elif kind == "image":
                client.log_image(run_id, content, artifact_file=name)
            else:
                client.log_text(run_id, content, name)


def _dataset_inputs(splits: list) -> list[DatasetInput]:
    """(context, {name, digest, source, schema, profile}) as MLflow dataset inputs."""
    return [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                 source=json.dumps({"uri": d["source"]}),
                                 schema=json.dumps(d["schema"]), profile=json.dumps(d["profile"])),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for context, d in splits]


@contextlib.contextmanager
def _artifact(name: str, run_id: str, artifacts: Path) -> Iterator[None]:
    """An artifact that cannot be written is a StorageError naming it."""
    try:
        yield
    except OSError as err:
        raise StorageError(f"cannot write artifact {name} of run {run_id} under {artifacts}: "
                           f"{err.strerror or err}") from None
