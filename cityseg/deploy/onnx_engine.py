"""`predict --engine onnxruntime`: the exported graph run by ONNX Runtime in place of the
Predictor.

predict (files, and video) asks its predictor one thing, `predict_photo(photo) -> (labels,
foreground probability or None)`; OnnxRuntimeEngine answers it from an exported file (or one
exported on the fly, in memory), so the same code writes the same files whichever engine runs.
A file is used only for the model it was exported from: its metadata must agree with the
loaded model on everything that decides a prediction (export.PREDICTS).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cityseg.data.tasks import Task
from cityseg.deploy import export
from cityseg.errors import CitysegError

if TYPE_CHECKING:
    from cityseg.infer.loading import Trained


class OnnxRuntimeEngine:
    """An ONNX Runtime session of an exported graph behind the Predictor's predict_photo."""

    def __init__(self, *, model: bytes | Path, task: Task, threshold: float, cuda: bool) -> None:
        ort = export.onnx_modules()[1]
        wanted = ("CUDAExecutionProvider",) * cuda + ("CPUExecutionProvider",)
        providers = [p for p in wanted if p in ort.get_available_providers()]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no notes on nodes assigned to the CPU
        self.session = ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), options, providers=providers)
        self.task = task
        self.threshold = threshold  # the one in the graph, for those who ask Trained.threshold
        # mask pixel value -> label, over the labels the task predicts (binary 255 -> 1)
        self.labels_of = np.zeros(256, dtype=np.uint8)
        self.labels_of[task.mask_values[:task.num_classes]] = np.arange(task.num_classes)

    def predict_photo(self, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W, 3) uint8 photo -> (labels at its size, foreground probability or None)."""
        image = np.ascontiguousarray(photo.transpose(2, 0, 1)[None])  # (1, 3, H, W)
        mask, probabilities = self.session.run(list(export.OUTPUTS), {export.INPUT: image})
        labels = self.labels_of[mask[0]]
        return labels, (probabilities[0, 0] if self.task.thresholded else None)


def engine_for(trained: Trained, onnx: Path | None) -> OnnxRuntimeEngine:
    """The engine of a trained model: from `onnx`, a file exported from it, else exported now;
    on the CUDA provider when the model's device (--device) is a GPU and onnxruntime has it."""
    export.check_whole_frame(trained, "--engine onnxruntime")
    settings = {"task": trained.task, "threshold": trained.threshold,
                "cuda": trained.predictor.device.type == "cuda"}
    if onnx is None:
        return OnnxRuntimeEngine(model=export.onnx_model(trained).SerializeToString(),
                                 **settings)
    if not onnx.is_file() or onnx.suffix != ".onnx":
        raise CitysegError(f"--onnx {onnx}: not an .onnx file (cityseg export --format onnx "
                           f"writes one)")
    found, expected = export.read_metadata(onnx), export.metadata(trained)
    for key in export.PREDICTS:
        if found.get(key) != expected[key]:  # absent from a file cityseg did not write
            raise CitysegError(f"--onnx {onnx}: {key} {found.get(key)!r} in the file, "
                               f"{expected[key]!r} for the model given; export it again "
                               f"(cityseg export)")
    return OnnxRuntimeEngine(model=onnx, **settings)
