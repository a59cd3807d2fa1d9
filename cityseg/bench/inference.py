"""Inference speed at full resolution, side by side: how fast does cityseg turn a frame into a
mask, in each inference mode, on torch eager, torch compiled and ONNX Runtime; how fast is
`predict` end to end, and what bounds it.

Batch 1, frames at their own size (1024x2048 for Cityscapes and the bench's synthetic frames),
the baseline experiment's network (untrained: speed does not depend on the weights) with
data.scale at the frame size: `whole` runs the network on the full frame, `slide` windows of
data.image_size over it (trainer.inference.overlap), `slide+flip` that and the mirror image.
Every torch cell is the Predictor's own path (uint8 frame -> labels), in the experiment's
precision and memory layout. ONNX Runtime runs `whole` through the exported graph (`cityseg
export`: resize, normalise, network, upsample, mask, in fp32). The graph refuses sliding
windows (a loop over the photo's size it does not hold), so `slide` runs the network alone,
exported to ONNX, inside the Predictor's window loop: the same windows, ONNX Runtime's kernels.

The first call at each shape the network meets (the full frame, a row of windows) warms up
allocation, kernel choice, compilation and export; it is not timed. Cells are timed round
robin (`repeats` rounds of `frames` frames each), so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cityseg import viz
from cityseg.bench.baseline import BASELINE_FILE, BASELINE_SHAPE
from cityseg.bench.steps import matmul_peak
from cityseg.config import Experiment, InferenceConfig, load_experiment
from cityseg.data.layouts import IMAGE_EXTS, read_photo
from cityseg.errors import DataError
from cityseg.infer.files import input_files, predict_files, save_png
from cityseg.infer.loading import Trained
from cityseg.infer.predictor import Predictor, place_model
from cityseg.registry import MODELS

MODES = {"whole": InferenceConfig(mode="whole"), "slide": InferenceConfig(mode="slide"),
         "slide+flip": InferenceConfig(mode="slide", tta="flip")}
ENGINES = ("eager", "compiled", "onnxruntime")
PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def inference_experiment(root: Path, *, frame_size: tuple[int, int], device: str,
                         image_size: tuple[int, int] = tuple(BASELINE_SHAPE["image_size"]),
                         depth: int = BASELINE_SHAPE["depth"],
                         base_channels: int = BASELINE_SHAPE["base_channels"]) -> Experiment:
    """The baseline experiment inferring frames of `frame_size` (data.scale) with windows of
    `image_size`."""
    return load_experiment(BASELINE_FILE, [
        f"data.root={root}", "data.layout=official", f"data.image_size={list(image_size)}",
        f"data.scale={list(frame_size)}", f"model.depth={depth}",
        f"model.base_channels={base_channels}", f"trainer.device={device}",
        "tracking.dir=runs/bench/runs", "tracking.experiment=bench"])


def bench_files(root: Path, count: int) -> list[Path]:
    """The first `count` photos of a dataset (its leftImg8bit folder in the official layout),
    found as predict finds them."""
    folder = root / "leftImg8bit" if (root / "leftImg8bit").is_dir() else root
    files = [p for p in input_files([folder]) if p.suffix.lower() in IMAGE_EXTS][:count]
    if not files:
        raise DataError(f"{folder}: no photos to time inference on")
    return files


def untrained(exp: Experiment) -> Trained:
    """The experiment's network with seeded random weights, inside its Predictor, as
    inference.load_trained would hand over a trained one."""
    torch.manual_seed(0)
    model = place_model(MODELS.build(exp.model, exp.build_context()).eval(), exp,
                        exp.trainer.device)
    return Trained(exp, Predictor.for_experiment(exp, model), checkpoint={},
                   path=Path("untrained"), run_id="bench-untrained")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OnnxNetwork(nn.Module):
    """The network alone, run by ONNX Runtime in fp32 behind the module interface the
    Predictor calls; exported once per input shape (static shapes: what ONNX Runtime
    optimises best)."""

    def __init__(self, model: nn.Module, trained: Trained) -> None:
        super().__init__()
        # not a submodule: its weights stay out of parameters(), on the CPU where export runs
        self._network = [copy.deepcopy(model).to(
            "cpu", torch.float32, memory_format=torch.contiguous_format).eval()]
        self.sessions: dict[tuple[int, ...], object] = {}
        # the engine predict --engine onnxruntime builds: its providers and session options
        self.settings = {"task": trained.task, "threshold": trained.threshold,
                         "cuda": trained.predictor.device.type == "cuda"}

    def _session(self, shape: tuple[int, ...]):
        from cityseg.deploy import export
        from cityseg.deploy.onnx_engine import OnnxRuntimeEngine

        export.onnx_modules()  # a missing extra is said by name
        with torch.inference_mode(False), torch.no_grad():
            proto = torch.onnx.export(self._network[0], (torch.zeros(shape),), f=None,
                                      input_names=["x"], output_names=["logits"],
                                      opset_version=export.OPSET, dynamo=True,
                                      external_data=False, verbose=False).model_proto
        return OnnxRuntimeEngine(model=proto.SerializeToString(), **self.settings).session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in self.sessions:
            self.sessions[shape] = self._session(shape)
        (logits,) = self.sessions[shape].run(
            ["logits"], {"x": np.ascontiguousarray(x.detach().float().cpu().numpy())})
        return torch.from_numpy(logits).to(x.device)


def _predictors(trained: Trained, model: nn.Module, *, fp32_nchw: bool = False
                ) -> dict[str, Predictor]:
    """A Predictor per mode around `model`, as the experiment configures it (or in fp32 and
    NCHW: what ONNX Runtime is handed)."""
    exp = trained.exp
    if fp32_nchw:
        exp = exp.model_copy(update={"trainer": exp.trainer.model_copy(
            update={"precision": "fp32", "channels_last": False})})
    return {mode: Predictor.for_experiment(exp, model, inference=cfg)
            for mode, cfg in MODES.items()}


def engine_calls(engine: str, trained: Trained) -> tuple[dict[str, Callable], dict[str, str]]:
    """({mode: uint8 frame -> prediction}, {mode: precision}) of an engine."""
    model = trained.predictor.model
    if engine == "eager":
        found = _predictors(trained, model)
    elif engine == "compiled":
        found = _predictors(trained, torch.compile(model, dynamic=False))
    else:
        from cityseg.deploy import export
        from cityseg.deploy.onnx_engine import engine_for

        found = _predictors(trained, OnnxNetwork(model, trained), fp32_nchw=True)
        graph = engine_for(trained, None).session  # the exported graph, in memory
        calls = {mode: p.predict for mode, p in found.items()}
        calls["whole"] = lambda frame: graph.run(list(export.OUTPUTS),
                                                 {export.INPUT: frame.cpu().numpy()})
        return calls, {mode: "fp32" for mode in MODES}
    return ({mode: p.predict for mode, p in found.items()},
            {mode: PRECISIONS[p.amp_dtype] for mode, p in found.items()})


def flops_per_frame(trained: Trained, frame_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs of the forward passes each mode runs on one frame, counted by torch on the meta
    device (no compute): the Predictor's own window loop, the network's convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(trained.predictor.model).to("meta")
    found = {}
    for mode, cfg in MODES.items():
        p = trained.predictor
        predictor = Predictor(model=meta, device=torch.device("meta"), amp_dtype=None,
                              channels_last=False, task=p.task, threshold=p.threshold,
                              image_size=p.image_size, frame_size=p.frame_size, inference=cfg)
        with FlopCounterMode(display=False) as counter:
            predictor.predict(torch.zeros(frame_shape, dtype=torch.uint8, device="meta"))
        found[mode] = float(counter.get_total_flops())
    return found


def _cell(latencies: list[float], *, precision: str, flops: float, peak: float | None) -> dict:
    """Frames/s, latency percentiles and MFU (against the matmul peak in the cell's precision)."""
    fps = len(latencies) / sum(latencies)
    ms = np.asarray(latencies) * 1000
    return {"frames_per_s": fps, "precision": precision, "n": len(latencies),
            "latency_ms": {"p50": float(np.percentile(ms, 50)),
                           "p95": float(np.percentile(ms, 95))},
            "latencies_ms": [round(float(v), 1) for v in ms],
            "mfu": flops * fps / peak if peak else None}


def warm_engines(trained: Trained, frame: torch.Tensor, *, engines: tuple[str, ...],
                 modes: tuple[str, ...]) -> dict[str, dict]:
    """{engine: its calls and precisions, the seconds its warm-up took (compilation, export),
    or the error}: an engine that cannot be built or warmed up (torch.compile without a C++
    compiler, ONNX without the extra) is reported, and the others still count."""
    device, height = trained.predictor.device, trained.predictor.image_size[0]
    found = {}
    for engine in engines:
        start = time.perf_counter()
        try:
            calls, precision = engine_calls(engine, trained)
            for mode in modes:  # first call at each shape: the frame, a row of windows
                calls[mode](frame if mode == "whole" else frame[..., :height, :])
            _sync(device)
        except Exception as err:
            if engine == "eager":  # cityseg's own path: a failure there is a bug to see
                raise
            text = str(err).strip()
            found[engine] = {"error": f"{type(err).__name__}: {text.splitlines()[0]}" if text
                             else type(err).__name__}
            continue
        found[engine] = {"error": None, "calls": calls, "precision": precision,
                         "warmup_s": time.perf_counter() - start,
                         "latencies": {mode: [] for mode in modes}}
    return found


def time_round(engines: dict[str, dict], frames: list[torch.Tensor], *, modes: tuple[str, ...],
               per_cell: int, device: torch.device) -> None:
    """One round: `per_cell` frames through every ready engine x mode, latencies appended."""
    for found in engines.values():
        if found["error"]:
            continue
        for mode in modes:
            for k in range(per_cell):
                _sync(device)
                start = time.perf_counter()
                found["calls"][mode](frames[k % len(frames)])
                _sync(device)
                found["latencies"][mode].append(time.perf_counter() - start)


PEAK_SAMPLES = 8  # a peak is the best the host shows: short samples, the fastest kept


def matmul_peaks(device: torch.device, seconds: float, n: int) -> dict[str, float | None]:
    """Measured fp32 matmul FLOP/s, and bf16 where the device has it natively (CUDA, AVX512-BF16
    or AMX; None where it has not) of n x n matmuls: the best of PEAK_SAMPLES samples lasting
    `seconds` in all, so that a busy moment of a shared machine does not lower it."""
    from cityseg.runtime.device import cpu_has_native_bf16

    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    native = {"fp32": True, "bf16": device.type == "cuda" or cpu_has_native_bf16()}
    return {name: max(matmul_peak(device, dtype, n=n, seconds=seconds / PEAK_SAMPLES)
                      for _ in range(PEAK_SAMPLES)) if native[name] else None
            for name, dtype in dtypes.items()}


def bare_forward(trained: Trained, frame: torch.Tensor, count: int) -> float:
    """Frames/s of the network alone on a normalised frame, after one untimed pass (which also
    warms up predict's network at the frame's size)."""
    p, device = trained.predictor, trained.predictor.device
    with torch.inference_mode():
        x = p.inputs(frame)
        p.logits(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(count):
            p.logits(x)
        _sync(device)
    return count / (time.perf_counter() - start)


def predict_split(trained: Trained, files: list[Path], *, repeats: int, out: Path) -> dict:
    """Seconds per frame of `predict` end to end (inference.predict_files: decode, whole-frame
    inference, mask and overlay PNGs) and of its three steps timed apart with the functions it
    calls; each file predicted both ways in turn, `repeats` times, medians. The network must
    be warm at the photos' size (bare_forward)."""
    predictor, task = trained.predictor, trained.task
    (out / "split").mkdir(parents=True, exist_ok=True)
    end_to_end, parts = [], {"decode": [], "model": [], "write": []}
    for _ in range(repeats):
        for path in files:
            start = time.perf_counter()
            predict_files(trained, [path], out / "predict", probabilities=False)
            end_to_end.append(time.perf_counter() - start)
            t0 = time.perf_counter()
            photo = read_photo(path)
            t1 = time.perf_counter()
            labels, _ = predictor.predict_photo(photo)
            t2 = time.perf_counter()
            save_png(task.mask_values[labels], out / "split" / f"{path.stem}_mask.png", written=0)
            save_png(viz.overlay(photo, labels, task), out / "split" / f"{path.stem}_overlay.png",
                     written=0)
            t3 = time.perf_counter()
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[part].append(seconds)
    split = {part: float(np.median(v)) for part, v in parts.items()}
    # the fastest of each against the other: another process only ever adds time
    sums = np.add(np.add(parts["decode"], parts["model"]), parts["write"])
    return {"files": len(files), "s_per_frame": float(np.median(end_to_end)),
            "s_per_frame_runs": [round(v, 3) for v in end_to_end], "split_s": split,
            "split_sum_s": sum(split.values()),
            "split_vs_end_to_end": float(sums.min() / min(end_to_end)),
            "bound_by": max(split, key=split.get)}


def bench_inference(exp: Experiment, files: list[Path], *, frames: int, repeats: int,
                    predict_count: int, out: Path, engines: tuple[str, ...] = ENGINES,
                    modes: tuple[str, ...] = tuple(MODES), peak_seconds: float = 2.0,
                    peak_size: int = 2048) -> dict:
    """The inference report (the `inference` object of --json): every engine x mode cell on
    `frames` frames a round, `repeats` rounds; FLOPs, the matmul peak and MFU; predict end to
    end on `predict_count` files against the bare forward pass."""
    trained, size = untrained(exp), tuple(exp.data.frame_size)
    photos = []
    for path in files[:frames]:
        photo = read_photo(path)
        if photo.shape[:2] != size:
            raise DataError(f"{path}: {photo.shape[1]}x{photo.shape[0]} pixels, the bench "
                            f"infers frames of {size[1]}x{size[0]} (those of the first file)")
        photos.append(torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous())  # (1,3,H,W)
    device = trained.predictor.device
    ready = warm_engines(trained, photos[0], engines=engines, modes=modes)
    # the peak before every round and after the last, the best kept: on a shared machine one
    # measurement may fall in a busy moment
    peaks = [matmul_peaks(device, peak_seconds, peak_size)]
    for _ in range(repeats):
        time_round(ready, photos, modes=modes, per_cell=frames, device=device)
        peaks.append(matmul_peaks(device, peak_seconds, peak_size))
    peak = {name: max(p[name] for p in peaks) if peaks[0][name] else None for name in peaks[0]}
    flops = flops_per_frame(trained, tuple(photos[0].shape))
    results = {}
    for engine, found in ready.items():
        results[engine] = {"error": found["error"], "modes": {}} if found["error"] else {
            "error": None, "warmup_s": found["warmup_s"], "modes": {
                mode: _cell(found["latencies"][mode], precision=found["precision"][mode],
                            flops=flops[mode], peak=peak.get(found["precision"][mode]))
                for mode in modes}}
    bare = bare_forward(trained, photos[0], frames * repeats)
    predict = predict_split(trained, files[:predict_count], repeats=repeats, out=out)
    predict.update(frames_per_s=1 / predict["s_per_frame"], bare_forward_frames_per_s=bare,
                   end_to_end_vs_bare_forward=1 / predict["s_per_frame"] / bare)
    return {"frame_size": list(size), "batch": 1, "window": list(exp.data.image_size),
            "overlap": exp.trainer.inference.overlap,
            "model": {"depth": exp.model.depth, "base_channels": exp.model.base_channels},
            "modes": list(modes), "frames_per_cell": frames * repeats,
            "flops_per_frame": flops, "matmul_peak_flops": peak, "engines": results,
            "predict": predict}
