"""The inference bench on a tiny network and tiny frames: the report's shape and sanity (never
its speed), and the host block every report carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cityseg.bench.host import CPU_FLAGS, host
from cityseg.bench.inference import (
    MODES,
    bench_files,
    bench_inference,
    inference_experiment,
    untrained,
)
from cityseg.data.synthetic import write_dataset

FRAME, WINDOW = (64, 128), (32, 64)


def _bench(root: Path, engines: tuple[str, ...]):
    """One bench run on 3 tiny frames; torch.compile failing as it does on a machine without a
    C++ compiler (compiling for real takes a minute here)."""
    write_dataset(root, num_train=3, num_val=0, size=FRAME, seed=0)
    exp = inference_experiment(root, frame_size=FRAME, device="cpu", image_size=WINDOW,
                               depth=2, base_channels=4)

    class NoCompiler(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", lambda model, **kw: NoCompiler())
        found = bench_inference(exp, bench_files(root, 3), frames=2, repeats=3, predict_count=2,
                                out=root / "out", engines=engines, peak_seconds=0.1,
                                peak_size=256)
    return exp, found, root / "out"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("frames"), ("eager", "compiled"))


def _check_cells(r: dict, engine: str) -> None:
    assert r["engines"][engine]["error"] is None
    assert list(r["engines"][engine]["modes"]) == list(MODES)
    for cell in r["engines"][engine]["modes"].values():
        assert cell["n"] == len(cell["latencies_ms"]) == 6
        assert cell["frames_per_s"] > 0
        assert cell["latency_ms"]["p50"] <= cell["latency_ms"]["p95"]
        rounded = 0.05  # latencies_ms are rounded to 0.1 ms
        assert min(cell["latencies_ms"]) - rounded <= cell["latency_ms"]["p50"]
        assert cell["latency_ms"]["p95"] <= max(cell["latencies_ms"]) + rounded
        assert cell["precision"] in ("fp32", "bf16")
        assert 0 < cell["mfu"] < 1


def test_every_cell_has_a_speed_latencies_and_an_mfu(report):
    _, r, _ = report
    json.dumps(r)  # what --json prints
    assert r["frame_size"] == list(FRAME) and r["window"] == list(WINDOW) and r["batch"] == 1
    assert r["modes"] == list(MODES) and r["frames_per_cell"] == 6
    _check_cells(r, "eager")


@pytest.mark.slow  # exporting the graph takes 10-30 s on 2 shared cores
def test_onnxruntime_runs_the_graph_whole_and_the_network_in_the_window_loop(tmp_path):
    _, r, _ = _bench(tmp_path, ("onnxruntime",))
    _check_cells(r, "onnxruntime")
    assert {cell["precision"] for cell in r["engines"]["onnxruntime"]["modes"].values()} == {
        "fp32"}


def test_a_compiler_that_fails_is_reported_not_raised(report):
    _, r, _ = report
    assert r["engines"]["compiled"] == {
        "error": "RuntimeError: InvalidCxxCompiler: no working C++ compiler found", "modes": {}}


def test_flops_are_the_networks_convolutions_in_each_mode(report):
    exp, r, _ = report
    model = untrained(exp).predictor.model
    with FlopCounterMode(display=False) as whole, torch.no_grad():
        model(torch.zeros(1, 3, *FRAME))
    with FlopCounterMode(display=False) as window, torch.no_grad():
        model(torch.zeros(1, 3, *WINDOW))
    flops = r["flops_per_frame"]
    assert flops["whole"] == whole.get_total_flops()
    # windows of a quarter of the frame: a whole number of them, more than fit side by side
    windows = flops["slide"] / window.get_total_flops()
    assert windows == int(windows) and windows > 4
    assert flops["slide+flip"] == 2 * flops["slide"]
    assert r["matmul_peak_flops"]["fp32"] > 0


def test_predict_end_to_end_splits_into_decode_model_and_write(report):
    _, r, out = report
    p = r["predict"]
    assert p["files"] == 2 and len(p["s_per_frame_runs"]) == 6
    assert set(p["split_s"]) == {"decode", "model", "write"}
    assert all(v > 0 for v in p["split_s"].values())
    assert p["split_sum_s"] == pytest.approx(sum(p["split_s"].values()))
    # the same three steps, timed apart: about predict's own time (a ratio of the fastest of
    # each, not a speed)
    assert 0.5 < p["split_vs_end_to_end"] < 2
    assert p["bound_by"] == max(p["split_s"], key=p["split_s"].get)
    assert p["frames_per_s"] == pytest.approx(1 / p["s_per_frame"])
    assert p["bare_forward_frames_per_s"] > 0 and p["end_to_end_vs_bare_forward"] > 0
    written = sorted(f.name for f in (out / "predict").iterdir())
    assert written == [f"synthtown_00000{i}_000019_leftImg8bit_{kind}.png"
                       for i in (0, 1) for kind in ("mask", "overlay")]


def test_the_host_block_names_the_cpu_and_its_matrix_instructions(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
                       "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2\n")
    found = host(torch.device("cpu"), cpuinfo=cpuinfo)
    assert found["cpu"] == "AMD EPYC 9R14 96-Core Processor"
    assert found["cpu_flags"] == {"amx_bf16": False, "amx_tile": False, "avx512_bf16": True,
                                  "avx512f": True, "avx2": True}
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert 1 <= found["cpu_affinity"] <= found["cpu_count"] and found["gpu"] is None
    missing = host(torch.device("cpu"), cpuinfo=tmp_path / "absent")
    assert missing["cpu_flags"] is None and missing["cpu"].startswith("unknown")


def test_the_json_keeps_the_training_report_and_adds_host_and_inference(tmp_path, monkeypatch,
                                                                          capsys):
    from cityseg.bench import __main__ as bench

    root = tmp_path / "frames"
    write_dataset(root, num_train=1, num_val=0, size=FRAME, seed=0)
    training = {"schema": 1, "speedup": 4.1, "end_to_end": {"images_per_s": {"median": 3.1}}}
    seen = {}
    monkeypatch.setattr(bench, "bench_side_by_side", lambda root, **kw: dict(training))
    monkeypatch.setattr(bench, "bench_inference",
                        lambda exp, files, **kw: seen.update(exp=exp, files=files, **kw) or {})
    monkeypatch.setattr("sys.argv", ["bench", "--json", "--cityscapes", str(root),
                                     "--inference-frames", "3", "--inference-modes", "whole"])
    bench.main()
    r = json.loads(capsys.readouterr().out)
    assert {k: r[k] for k in training} == training  # additive: every training key kept
    assert r["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(r["host"]["cpu_flags"] or CPU_FLAGS) == set(CPU_FLAGS)
    assert r["inference"] == {} and r["frames"] == str(root)
    assert seen["frames"] == 3 and seen["modes"] == ("whole",)
    assert seen["exp"].data.frame_size == FRAME and len(seen["files"]) == 1
