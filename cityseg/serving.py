"""cityseg as an MLflow pyfunc model, logged as "models from code": nothing is pickled.

Input: uint8 RGB images, (N, H, W, 3) or one (H, W, 3), of any H and W. Output: (N, H, W)
uint8 masks at the images' size, exactly as `cityseg predict` writes them (binary: 0/255,
multiclass: train ids), through the same Predictor: resized to the training size, logits
upsampled bilinearly, the threshold stored in the checkpoint. The weights and the resolved
config travel as a slim checkpoint (state dict + config) loaded with weights_only=True, and
the cityseg package travels as the model's code, so the model runs where cityseg is not
installed (`mlflow models serve -m URI --env-manager local`).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class CitysegModel(PythonModel):
    def load_context(self, context) -> None:
        from cityseg.engine.inference import load_trained

        self.trained = load_trained(run_id=None, checkpoint=Path(context.artifacts["checkpoint"]),
                                    runs=Path("."))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from cityseg.engine.inference import predict_masks

        return predict_masks(self.trained, np.asarray(model_input))


mlflow.models.set_model(CitysegModel())
