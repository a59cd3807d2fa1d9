"""The servable model: cityseg as an MLflow pyfunc, how it is logged, and what it needs.

Logged as "models from code": nothing is pickled. MLflow runs this very file as the model's
code, and the last lines hand it the model (mlflow.models.set_model).

Input: uint8 RGB images, (N, H, W, 3) or one (H, W, 3), of any H and W. Output: (N, H, W)
uint8 masks at the images' size, exactly as `cityseg predict` writes them (binary: 0/255,
multiclass: train ids), through the same Predictor: resized to the training size, logits
upsampled bilinearly, the threshold stored in the checkpoint. The weights and the resolved
config travel as a slim checkpoint (state dict + config) loaded with weights_only=True, and
the cityseg package travels as the model's code, so the model runs where cityseg is not
installed (`mlflow models serve -m URI --env-manager local`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.pyfunc import PythonModel

from cityseg.infer.loading import load_trained, predict_masks
from cityseg.metrics import best_name

if TYPE_CHECKING:
    from cityseg.tracking.session import Tracker


class CitysegModel(PythonModel):
    """The pyfunc: a trained cityseg checkpoint behind `predict(images) -> masks`."""

    # MLflow would advise, at class definition, type-hinting predict: the input is an image
    # array that cityseg checks itself, and MLflow's own input validation stays off
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.trained = load_trained(run_id=None, checkpoint=Path(context.artifacts["checkpoint"]),
                                    runs=Path("."))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return predict_masks(self.trained, np.asarray(model_input))


def model_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was trained with."""
    from importlib.metadata import version

    packages = ("torch", "torchvision", "numpy", "pillow", "pydantic", "pyyaml", "kornia", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_model(tracker: Tracker, *, name: str, checkpoint: Path, example: np.ndarray,
              metrics: dict[str, float], step: int, dataset: tuple[str, str] | None,
              register: str | None) -> str:
    """Log the servable model `name` of the tracker's run (this file as its code, with the
    slim `checkpoint` and the cityseg package), its metrics (`metrics` at `step`, linked to the
    dataset (name, digest) they were scored on, so the Models tab shows it), and register it
    under `register` if asked; returns its model URI."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # images of any size in, masks of the same size out
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))
    package = Path(__file__).parents[1]  # cityseg/
    logging.getLogger("mlflow.models").setLevel(logging.ERROR)  # no pip resolution notes
    client = tracker.store.client
    # a model this run began to log before (a process killed meanwhile) is deleted: the run
    # keeps the one logged now, once
    for earlier in client.search_logged_models(
            [tracker.experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'"):
        client.delete_logged_model(earlier.model_id)
    # created here and logged outside the run: logged inside it, MLflow would copy every run
    # metric of one step into the model's (the system metrics too); the model's metrics are
    # only those scored on the validation set, and it is the run's output at the best epoch
    logged = client.create_logged_model(
        tracker.experiment_id, name=name, source_run_id=tracker.run_id,
        params={k: str(v) for k, v in client.get_run(tracker.run_id).data.params.items()})
    # quiet: MLflow's advice to type-hint predict (the input is an image array that cityseg
    # checks itself); its warning filters are reset by MLflow, so the notes are dropped here
    with _fluent(tracker.uri), contextlib.redirect_stderr(io.StringIO()):
        info = mlflow.pyfunc.log_model(
            name=name, model_id=logged.model_id, python_model=str(Path(__file__)),
            artifacts={"checkpoint": str(checkpoint)}, code_paths=[str(package)],
            signature=signature, input_example=example, pip_requirements=model_requirements())
    client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=step)])
    # log_model made the model the thread's active one: what is logged next is the run's
    mlflow.clear_active_model()
    # the model's own metrics (MLflow 3 logged models; they are the run's too, so named
    # val/best/... and the per-epoch histories keep one value per epoch)
    dataset_name, dataset_digest = dataset or (None, None)
    for key, value in metrics.items():
        tracker.store.client.log_metric(tracker.run_id, best_name(key), value, step=step,
                                        model_id=info.model_id, dataset_name=dataset_name,
                                        dataset_digest=dataset_digest)
    tags = {"model_uri": info.model_uri}
    if register:
        with _fluent(tracker.uri):  # the registry resolves the model's source through it
            version = mlflow.register_model(info.model_uri, register)
        tags["registered_model"] = f"models:/{register}/{version.version}"
    tracker.set_tags(tags)
    return info.model_uri


@contextlib.contextmanager
def _fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for a block. mlflow.set_tracking_uri also sets
    MLFLOW_TRACKING_URI, which cityseg reads first: it is put back as it was afterwards."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


if __name__ != "cityseg.deploy.pyfunc":  # MLflow running this file as the logged model's code
    mlflow.models.set_model(CitysegModel())
