"""`cityseg export` (ONNX, torch.export) and `predict --engine onnxruntime`: the exported graph
gives what `predict` writes, at any size, for binary and multiclass models."""

import builtins
import functools
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import cityseg
from cityseg import checkpoints, tracking
from cityseg.cli import main
from cityseg.cli.parser import build_parser
from cityseg.config import load_experiment
from cityseg.data.synthetic import render_scene
from cityseg.deploy import export
from cityseg.errors import CitysegError
from cityseg.infer import loading
from cityseg.models.encoders import IMAGENET_MEAN as MEAN
from cityseg.models.encoders import IMAGENET_STD as STD
from cityseg.registry import MODELS
from tests.conftest import CITYSCAPES_MINI, QUICKSTART, tiny_overrides

FP32 = ["trainer.precision=fp32"]  # the graph runs in fp32; so must the reference
SIZES = [(24, 50), (120, 250)]  # neither the training size (32, 64): one up, one down


def _photo(size, seed=0):
    return render_scene(np.random.default_rng(seed), *size)[0]


def _checkpoint(folder: Path, task: str, run_id: str) -> Path:
    """A tiny U-Net of the quickstart as a checkpoint, with random weights and the batch-norm
    statistics of a few synthetic scenes (no training: agreement needs none, and its
    predictions vary with the picture as a trained model's do); binary at the median
    foreground probability of a photo, so that many pixels are close calls."""
    extra = ["loss={name: cross_entropy}"] if task == "multiclass" else []
    exp = load_experiment(QUICKSTART, [*tiny_overrides(folder), f"data.task={task}", *extra])
    torch.manual_seed(0)
    model = MODELS.build(exp.model, exp.build_context())
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # the plain mean over the batch
    scenes = torch.from_numpy(np.stack([_photo((32, 64), 100 + i) for i in range(8)]))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    with torch.no_grad():
        model.train()(((scenes.permute(0, 3, 1, 2) / 255) - mean) / std)
    path = folder / f"{task}.pt"
    saved = {"format": checkpoints.FORMAT, "config": exp.model_dump(mode="json"), "state": {},
             "run_id": run_id, "model": model.state_dict()}
    checkpoints.save_atomic(saved, path)
    if task == "binary":
        trained = loading.load_trained(run_id=None, checkpoint=path, runs=folder, overrides=FP32)
        _, prob = trained.predictor.predict_photo(_photo(SIZES[1]))
        checkpoints.save_atomic({**saved, "threshold": float(np.median(prob))}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per task: the checkpoint and its exports, written by `cityseg export`."""
    folder = tmp_path_factory.mktemp("export")
    found = {}
    for task in ("binary", "multiclass"):
        path = _checkpoint(folder, task, run_id=f"run-{task}")
        files = {fmt: folder / f"{task}.{fmt}" for fmt in export.FORMATS}
        for fmt, out in files.items():
            assert main(["export", "--checkpoint", str(path), "--format", fmt,
                         "--out", str(out)]) == 0
        found[task] = (path, files)
    return found


def _trained(models, task, overrides=()):
    return loading.load_trained(run_id=None, checkpoint=models[task][0], runs=Path("runs"),
                                  overrides=[*FP32, *overrides])


@functools.cache
def _runner(file: Path):
    """The exported file, loaded once: (N, 3, H, W) uint8 -> (masks, probabilities)."""
    if file.suffix == ".onnx":
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return lambda batch: tuple(session.run(["mask", "probabilities"], {"image": batch}))
    module = torch.export.load(file).module()

    def run(batch):
        with torch.inference_mode():
            return tuple(t.numpy() for t in module(torch.from_numpy(batch)))

    return run


def _run(file: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) photos through the exported file: (masks, probabilities)."""
    return _runner(file)(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _predicted(trained, photo):
    """What predict writes for the photo (the mask file's values) and the probabilities the
    graph promises: predict's foreground probability (C = 1), or the softmax of its logits."""
    if trained.task.thresholded:
        labels, prob = trained.predictor.predict_photo(photo)
        return trained.task.mask_values[labels], prob[None]
    logits = trained.predictor.photo_logits(photo)  # what predict_photo takes the argmax of
    labels = trained.predictor.labels(logits)[0].numpy()
    return trained.task.mask_values[labels], torch.softmax(logits, dim=1)[0].numpy()


def _assert_agrees(trained, file, photos):
    masks, probabilities = _run(file, np.stack(photos))
    assert masks.dtype == np.uint8 and probabilities.dtype == np.float32
    assert masks.shape == (len(photos), *photos[0].shape[:2])
    assert probabilities.shape == (len(photos), trained.task.out_channels, *photos[0].shape[:2])
    for photo, mask, prob in zip(photos, masks, probabilities, strict=True):
        want_mask, want_prob = _predicted(trained, photo)
        assert len(np.unique(want_mask)) > 1  # not a trivial one-label picture
        assert np.mean(mask == want_mask) >= 0.999
        assert np.abs(prob - want_prob).max() <= 1e-3


@pytest.mark.parametrize("size", [(32, 64), (37, 71), (90, 170), (120, 250), (90, 71)],
                         ids=["smaller", "smaller-odd-ratio", "same", "larger", "width-only"])
def test_the_graphs_resize_gives_pils_pixels_to_the_bit(size):
    photo = _photo((90, 170), 4)
    want = np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BILINEAR))
    got = export.pil_bilinear(torch.from_numpy(photo).permute(2, 0, 1)[None], size)
    assert np.array_equal(got[0].permute(1, 2, 0).numpy(), want)


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_the_exported_graph_gives_what_predict_writes_at_other_sizes(models, task, fmt):
    trained = _trained(models, task)
    for size in SIZES:  # a batch of two (the batch axis is dynamic) at each size
        _assert_agrees(trained, models[task][1][fmt], [_photo(size, 1), _photo(size, 2)])


def _real_frame() -> np.ndarray:
    path = sorted((CITYSCAPES_MINI / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.skipif(not CITYSCAPES_MINI.is_dir(), reason="../shared/data/cityscapes-mini absent")
@pytest.mark.parametrize("fmt", export.FORMATS)
# multiclass: 19 probabilities of 2M pixels, upsampled and compared several times over
@pytest.mark.parametrize("task", ["binary", pytest.param("multiclass", marks=pytest.mark.slow)])
def test_the_exported_graph_gives_what_predict_writes_on_a_real_frame(models, task, fmt):
    frame = _real_frame()
    assert frame.shape == (1024, 2048, 3)
    trained = _trained(models, task)
    _assert_agrees(trained, models[task][1][fmt], [frame])
    _assert_agrees(trained, models[task][1][fmt], [np.ascontiguousarray(frame[100:612, 7:1000])])


def test_the_files_carry_their_metadata_and_pass_the_onnx_checker(models):
    path, files = models["binary"]
    threshold = checkpoints.load(path)["threshold"]
    want = {"cityseg_version": cityseg.__version__, "run_id": "run-binary", "task": "binary",
            "classes": ["background", "foreground"], "threshold": threshold,
            "training_size": [32, 64], "inference": "whole"}
    for file in files.values():
        found = export.read_metadata(file)
        found = {**found, "classes": json.loads(found["classes"]),
                 "threshold": float(found["threshold"]),
                 "training_size": json.loads(found["training_size"])}
        assert {key: found[key] for key in want} == want
    model = onnx.load(files["onnx"])
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 18  # Resize with antialias
    (image,) = model.graph.input
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(dims[i].dim_param for i in (0, 2, 3))  # dynamic
    assert [o.name for o in model.graph.output] == ["mask", "probabilities"]


def test_flip_tta_is_in_the_graph_when_the_model_infers_with_it(models, tmp_path):
    out = tmp_path / "flip.onnx"
    assert main(["export", "--checkpoint", str(models["binary"][0]), "--tta", "flip",
                 "--out", str(out)]) == 0
    assert export.read_metadata(out)["inference"] == "whole + flip"
    flipped = _trained(models, "binary", ["trainer.inference.tta=flip"])
    _assert_agrees(flipped, out, [_photo(SIZES[1], 3)])
    plain, _ = _run(models["binary"][1]["onnx"], _photo(SIZES[1], 3)[None])
    with_flip, _ = _run(out, _photo(SIZES[1], 3)[None])
    assert not np.array_equal(plain, with_flip)  # the mirror image's logits did count


def test_slide_inference_is_refused_with_advice(models, tmp_path, capsys):
    slide = _trained(models, "binary", ["trainer.inference.mode=slide"])
    with pytest.raises(CitysegError, match="export a whole-frame model: add --inference whole"):
        export.export(slide, fmt="onnx", out=tmp_path / "x.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(SIZES[0])).save(photos / "a.png")
    assert main(["predict", "--checkpoint", str(models["binary"][0]), str(photos),
                 "--out", str(tmp_path / "out"), "--inference", "slide",
                 "--engine", "onnxruntime"]) == 2
    assert "--engine onnxruntime: the model infers with sliding windows" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_without_the_export_extra_the_command_names_it(models, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.partition(".")[0] == "onnxruntime":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert main(["export", "--checkpoint", str(models["binary"][0]),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime is missing" in err and "pip install 'cityseg[export]'" in err
    assert not (tmp_path / "x.onnx").exists()


def _mask_files(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_predict_with_onnxruntime_writes_the_torch_engines_files(models, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate(SIZES):
        Image.fromarray(_photo(size, 10 + i)).save(photos / f"scene{i}.png")
    if CITYSCAPES_MINI.is_dir():
        Image.fromarray(_real_frame()).save(photos / "real.png")
    path, files = models["binary"]
    written = {}
    for engine, extra in (("torch", []), ("file", ["--onnx", str(files["onnx"])]),
                          ("on_the_fly", ["--engine", "onnxruntime"])):
        out = tmp_path / engine
        assert main(["predict", "--checkpoint", str(path), str(photos), "--out", str(out),
                     "--probabilities", *extra]) == 0
        written[engine] = _mask_files(out)
    torch_files = written.pop("torch")
    assert len(torch_files) == 3 * len(list(photos.iterdir()))  # mask, overlay, prob each
    for files_of_engine in written.values():
        assert files_of_engine.keys() == torch_files.keys()
        for name, image in files_of_engine.items():
            if name.endswith("_mask.png"):
                assert np.mean(image == torch_files[name]) >= 0.999, name
            else:  # probabilities within 1e-3 are within one level of 255 once rounded
                assert np.abs(image.astype(int) - torch_files[name]).max() <= 1, name


def test_predict_refuses_a_file_exported_from_another_model(models, tmp_path, capsys):
    photo = tmp_path / "a.png"
    Image.fromarray(_photo(SIZES[0])).save(photo)
    assert main(["predict", "--checkpoint", str(models["binary"][0]), str(photo),
                 "--out", str(tmp_path / "out"), "--onnx",
                 str(models["multiclass"][1]["onnx"])]) == 2
    assert "run_id 'run-multiclass' in the file" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(models["binary"][0]), str(photo),
                 "--out", str(tmp_path / "out"), "--engine", "torch",
                 "--onnx", str(models["binary"][1]["onnx"])]) == 2
    assert "--engine onnxruntime, not torch" in capsys.readouterr().err


def test_log_stores_the_file_in_the_runs_artifacts(tmp_path):
    runs = tmp_path / "runs"
    run_id = tracking.open(runs, experiment="quickstart").create_run(run_name="trained", tags={})
    path = _checkpoint(tmp_path, "multiclass", run_id=run_id)
    out = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(path), "--runs", str(runs), "--format", "pt2",
                 "--out", str(out), "--log"]) == 0
    store = tracking.open_store(runs)
    assert [a.path for a in store.client.list_artifacts(run_id, "export")] == ["export/model.pt2"]
    logged = store.client.download_artifacts(run_id, "export/model.pt2", str(tmp_path))
    assert export.read_metadata(Path(logged))["run_id"] == run_id
    store.client.set_terminated(run_id)  # the stand-in for a training run ends as one would


def test_the_command_lines_formats_are_the_exporters(capsys):
    parser = build_parser()
    assert parser.parse_args(["export", "--checkpoint", "m.pt"]).format == "onnx"
    for fmt in export.FORMATS:
        assert parser.parse_args(["export", "--checkpoint", "m.pt", "--format", fmt]).format == fmt
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--checkpoint", "m.pt", "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_without_out_the_file_goes_beside_the_runs_not_into_the_working_folder(
        tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    path = _checkpoint(tmp_path, "binary", run_id="0123456789abcdef")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(path), "--runs", str(runs), "--format",
                 "pt2"]) == 0
    assert [p.name for p in (runs / "exports").iterdir()] == ["quickstart-01234567.pt2"]
    assert not list(tmp_path.glob("*.pt2"))
