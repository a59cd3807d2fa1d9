"""Export a trained model as one graph: predict's whole-frame path, uint8 photos in, masks out.

`cityseg export` writes it as ONNX (ONNX Runtime, TensorRT, ...) or as a torch.export program
(`.pt2`), so the model runs where cityseg and its preprocessing are not. The graph is the
Predictor's whole-frame inference written in torch ops alone:

    image    uint8 (N, 3, H, W) RGB, any N, H, W
      -> resized to the frame size exactly as predict resizes it (PIL bilinear, `pil_bilinear`)
      -> normalised (the encoder's mean and std), the model run in fp32 (and on the mirror image,
         the two averaged, when the run infers with flip TTA)
      -> logits upsampled bilinearly (align_corners=False) to (H, W)
    mask           uint8 (N, H, W): exactly the pixel values of predict's <stem>_mask.png
                   (binary 0/255 by sigmoid > threshold, multiclass train ids by argmax)
    probabilities  float32 (N, C, H, W): binary: sigmoid of the one logit (C = 1, the
                   foreground probability predict writes as <stem>_prob.png); multiclass:
                   softmax over the 19 classes

The file carries what it was made from (`metadata`): a reader needs nothing else to use it.
"""

from __future__ import annotations

import copy
import io
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

import cityseg
from cityseg.data.tasks import Task
from cityseg.errors import CitysegError, StorageError
from cityseg.infer.predictor import at_size, flip_averaged, normalised, statistics
from cityseg.runtime.files import written_whole

if TYPE_CHECKING:
    from cityseg.infer.loading import Trained

Format = Literal["onnx", "pt2"]
FORMATS: tuple[Format, ...] = ("onnx", "pt2")
INPUT, OUTPUTS = "image", ("mask", "probabilities")
OPSET = 18  # read by every onnxruntime since 1.14
PT2_METADATA = "cityseg.json"  # the extra file of a .pt2 that holds its metadata
# the metadata that decides what the graph predicts: a file used for a model must agree on them
PREDICTS = ("run_id", "task", "classes", "threshold", "training_size", "inference")
EXTRA = "pip install 'cityseg[export]'"


def pil_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float (N, 3, h, w): exactly the pixels of PIL's bilinear resize
    of the uint8 photo (predict's resize), in torch ops that export: PIL's fixed-point weights
    (antialiased when shrinking), a pass along the width and then one along the height, each
    rounded to uint8 as PIL rounds. Float64 keeps every sum an exact integer, so any order of
    summation (ONNX Runtime's, torch's) gives PIL's result to the bit. Each pass is one matrix
    product with a dense (out, in) weight matrix: 1024x2048 -> 512x1024 costs 16 GFLOP of
    float64, less than a gather of the few taps per pixel costs in practice."""
    x = images.to(torch.float64)
    x = _rounded(x @ _pil_weights(x.shape[-1], size[1], x.device).T)  # (N, 3, H, w)
    return _rounded(_pil_weights(x.shape[-2], size[0], x.device) @ x).float()  # (N, 3, h, w)


_PRECISION_BITS = 22  # PIL's fixed point for 8-bit images (32 - 8 - 2)


def _pil_weights(length, size: int, device: torch.device) -> torch.Tensor:
    """(size, length) float64 integer weights of PIL's bilinear resize from `length` pixels to
    `size` (libImaging/Resample.c, precompute_coeffs and normalize_coeffs_8bpc); `length` may
    be a symbolic size."""
    source = torch.arange(length, dtype=torch.float64, device=device)  # (length,)
    scale = source.new_full((), length) / size
    support = torch.clamp(scale, min=1.0)  # the triangle widens by the factor it shrinks by
    center = (torch.arange(size, dtype=torch.float64, device=device) + 0.5) * scale  # (size,)
    distance = (source[None, :] - center[:, None] + 0.5) * (1.0 / support)
    weights = torch.clamp(1.0 - distance.abs(), min=0.0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.floor(weights * (1 << _PRECISION_BITS) + 0.5)


def _rounded(sums: torch.Tensor) -> torch.Tensor:
    """Fixed-point sums -> the uint8 values PIL stores (round half up, clipped), as float64."""
    half, one = float(1 << (_PRECISION_BITS - 1)), float(1 << _PRECISION_BITS)
    return torch.clamp(torch.floor((sums + half) / one), 0, 255)


class FrameGraph(nn.Module):
    """predict's whole-frame path (see the module docstring) around a model in fp32."""

    def __init__(self, *, model: nn.Module, task: Task, threshold: float,
                 frame_size: tuple[int, int], flip: bool, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__()
        self.model, self.task, self.threshold = model, task, threshold
        self.frame_size, self.flip = tuple(frame_size), flip
        scaled_mean, scaled_std = statistics(tuple(mean), tuple(std), torch.device("cpu"))
        self.register_buffer("mean", scaled_mean.clone(), persistent=False)
        self.register_buffer("std", scaled_std.clone(), persistent=False)
        # label -> mask pixel value, as predict writes masks
        self.register_buffer("mask_values", torch.from_numpy(task.mask_values.copy()),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalised(pil_bilinear(image, self.frame_size), self.mean, self.std)
        logits = flip_averaged(self.model, x) if self.flip else self.model(x)
        logits = at_size(logits, image.shape[-2:])  # (N, C, H, W)
        labels = self.task.labels(logits, threshold=self.threshold)
        probabilities = (torch.sigmoid(logits) if self.task.thresholded
                         else torch.softmax(logits, dim=1))
        return self.mask_values[labels], probabilities


def check_whole_frame(trained: Trained, what: str) -> None:
    """CitysegError unless the model infers whole frames: sliding windows are a loop over
    the photo's size that the graph does not hold."""
    if trained.exp.trainer.inference.mode != "whole":
        raise CitysegError(f"{what}: the model infers with sliding windows "
                           f"(trainer.inference.mode slide); export a whole-frame model: "
                           f"add --inference whole")


def graph_of(trained: Trained) -> FrameGraph:
    """The FrameGraph of a trained model, on the CPU in fp32 (the trained one is left as is)."""
    check_whole_frame(trained, "export")
    # contiguous: a channels_last weight is saved by torch.export as a view of another
    model = copy.deepcopy(trained.predictor.model).to(
        device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()
    return FrameGraph(model=model, task=trained.task, threshold=trained.threshold,
                      frame_size=trained.predictor.frame_size,
                      flip=trained.exp.trainer.inference.tta == "flip",
                      mean=trained.predictor.mean, std=trained.predictor.std).eval()


def metadata(trained: Trained) -> dict[str, str]:
    """What the file was made from, as strings (ONNX metadata_props hold strings)."""
    return {"cityseg_version": _cityseg_version(), "run_id": trained.run_id,
            "task": trained.task.name, "classes": json.dumps(list(trained.task.class_names)),
            "threshold": repr(float(trained.threshold)),
            "training_size": json.dumps(list(trained.predictor.frame_size)),
            "inference": trained.exp.trainer.inference.describe(),
            "inputs": "image: uint8 (N, 3, H, W) RGB",
            "outputs": "mask: uint8 (N, H, W) as predict writes it; probabilities: float32 "
                       "(N, C, H, W), binary sigmoid (C = 1), multiclass softmax"}


def _cityseg_version() -> str:
    try:
        return version("cityseg")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return cityseg.__version__


def default_out(trained: Trained, fmt: Format, runs: Path) -> Path:
    """`<runs>/exports/<experiment>-<run id prefix>.onnx` (or .pt2): beside the runs, never
    loose in the folder the command ran in (or in git)."""
    folder = runs / "exports"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"{folder}: cannot create the folder ({err.strerror}); give --out") \
            from None
    return folder / f"{trained.exp.name}-{trained.run_id[:8]}.{fmt}"


def export(trained: Trained, *, fmt: Format, out: Path) -> Path:
    """Write the model's FrameGraph to `out` as ONNX (checked with onnx.checker) or as a
    torch.export program, with its metadata; returns `out`."""
    check_out_file(out)
    # made in memory, then written whole: a full disk or a read-only folder is an OSError here
    # (torch's own writer aborts the process on one), and never leaves half a file
    if fmt == "onnx":
        data = onnx_model(trained).SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.export.save(_program(graph_of(trained)), buffer,
                          extra_files={PT2_METADATA: json.dumps(metadata(trained))})
        data = buffer.getvalue()
    try:
        with written_whole(out) as partial:
            partial.write_bytes(data)
    except OSError as err:
        raise StorageError(f"--out {out}: cannot write ({err.strerror or err}); nothing was "
                           f"left there") from None
    return out


def check_out_file(out: Path) -> None:
    """--out must be a file in an existing folder: refused before any model is loaded."""
    if out.is_dir() or not out.parent.is_dir():
        what = "is a folder" if out.is_dir() else f"its folder {out.parent} does not exist"
        raise StorageError(f"--out {out}: {what}; give a file in an existing folder")


def onnx_model(trained: Trained):
    """The model's FrameGraph as an onnx.ModelProto with its metadata, checked by
    onnx.checker (full check: shapes and types inferred through the graph)."""
    onnx = onnx_modules()[0]  # before the work: a missing extra is said at once
    program = _program(graph_of(trained))
    proto = torch.onnx.export(program, f=None, input_names=[INPUT], output_names=list(OUTPUTS),
                              opset_version=OPSET, dynamo=True, external_data=False,
                              verbose=False).model_proto
    for key, value in metadata(trained).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _program(graph: FrameGraph) -> torch.export.ExportedProgram:
    """The graph traced by torch.export with batch, height and width dynamic."""
    height, width = graph.frame_size
    # an example unlike any size a dimension could be specialised to: batch 2, a frame neither
    # the training size nor a multiple of it
    example = torch.zeros((2, 3, height + 3, width + 5), dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"),
            3: torch.export.Dim("width")}
    with torch.no_grad():
        return torch.export.export(graph, (example,), dynamic_shapes=(dims,))


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of an exported file (.onnx or .pt2)."""
    if path.suffix == ".pt2":
        extra = {PT2_METADATA: ""}
        torch.export.load(path, extra_files=extra)
        return json.loads(extra[PT2_METADATA])
    onnx = onnx_modules()[0]
    from google.protobuf.message import DecodeError  # protobuf: what onnx is written in

    try:
        proto = onnx.load(path, load_external_data=False)
    except (OSError, DecodeError) as err:
        raise CitysegError(f"{path}: not an ONNX file cityseg can read ({err})") from None
    return {p.key: p.value for p in proto.metadata_props}


def log_export(trained: Trained, path: Path, *, runs: Path) -> str:
    """The exported file stored in the artifacts of the run that trained the model, under
    export/; its runs:/ URI."""
    from cityseg.tracking.queries import add_artifact

    return add_artifact(runs, trained.run_id, path, "export", uri=trained.exp.tracking.uri)


def onnx_modules():
    """(onnx, onnxruntime), or CitysegError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter translates through it)
    except ImportError as err:
        raise CitysegError(f"ONNX export and --engine onnxruntime need onnx, onnxruntime and "
                           f"onnxscript ({err.name} is missing): {EXTRA}") from None
    return onnx, onnxruntime
