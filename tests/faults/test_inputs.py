"""Inputs that would exhaust memory or stop a batch: a 10,000-level nested YAML, an alias bomb
(in an experiment, a sweep file and a --set value), a PNG over PIL's pixel limit among good
images, an --out that is a file, and a 16-bit greyscale PNG. The commands run in this process
(a bomb that got through would exhaust it, or raise out of `main`, and fail the test); each ends
with the store as it was: no run made by a refused file, and the trained run still FINISHED
with one value per epoch."""

from types import SimpleNamespace

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cityseg import tracking
from cityseg.config import load_experiment
from cityseg.config.loading import YAML_MAX_DEPTH
from cityseg.data.synthetic import render_scene
from cityseg.train import runner
from tests.conftest import QUICKSTART, cityseg_here, tiny_overrides

EPOCHS = 2
ALIAS_BOMB = "\n".join(  # 9**9 values written out; half a kB on disk
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"


def cityseg(*args: str, cwd) -> SimpleNamespace:
    """`cityseg ARGS` in `cwd`: its returncode, stdout and stderr."""
    code, out, err = cityseg_here(*args, cwd=cwd)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def refused(proc: SimpleNamespace, message: str) -> None:
    """Exit 2, the one-line message, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, trained once for the predict faults: (runs folder, run id)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:  # its own store, whatever the shell says
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=EPOCHS),
                                           "tracking.log_model=false"])
        result = runner.run(exp)
    return tmp_path / "runs", result.run_id


def assert_run_intact(runs, run_id) -> None:
    """The trained run is as training left it: FINISHED, one val/dice per epoch."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(runs))
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val/dice")]
    assert steps == list(range(1, EPOCHS + 1))


@pytest.mark.parametrize("case", ["nested experiment", "alias bomb experiment",
                                  "alias bomb sweep file", "alias bomb --set"])
def test_yaml_that_would_exhaust_memory_or_the_stack_is_refused_with_file_and_line(
        tmp_path, case):
    nested = "name: deep\ndata: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n"
    path = tmp_path / "bad.yaml"
    if case == "nested experiment":  # a RecursionError traceback before
        path.write_text(nested)
        proc = cityseg("run", str(path), cwd=tmp_path)
        # 1-based, at the first key of the innermost mapping within the budget
        column = len("data: ") + len("{a: ") * (YAML_MAX_DEPTH - 2) + len("{") + 1
        message = (f"error: {path}: refused at line 2, column {column}: nested more than "
                   f"{YAML_MAX_DEPTH} levels deep")
    elif case == "alias bomb experiment":  # 30 s and 3.8 GB before
        path.write_text("name: bomb\ndata: {name: synthetic}\n" + ALIAS_BOMB)
        proc = cityseg("run", str(path), cwd=tmp_path)
        message = f"error: {path}: refused at line 8, column 10: alias *l4 expands the document"
    elif case == "alias bomb sweep file":
        path.write_text(f"name: bomb\nbase: {QUICKSTART}\n" + ALIAS_BOMB)
        proc = cityseg("sweep", str(path), cwd=tmp_path)
        message = f"error: {path}: refused at line 8, column 10: alias *l4 expands the document"
    else:
        bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]", *["*a"] * 20_000]) + "]"
        proc = cityseg("run", str(QUICKSTART), "--set", f"data.foreground={bomb}",
                       cwd=tmp_path)
        message = "error: --set data.foreground=...: refused: alias *a expands the document"
    refused(proc, message)
    assert not (tmp_path / "runs").exists()  # refused before any store or run was made


def test_predict_skips_a_png_over_the_pixel_limit_and_writes_the_others(trained, tmp_path):
    runs, run_id = trained
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(images / name)
    # a real, decodable PNG of 90 Mpx in 11 kB: 270 MB of RGB, more at full-resolution logits
    Image.new("1", (10_000, 9_000)).save(images / "b_bomb.png")
    (images / "d_text.png").write_text("not an image")
    out = tmp_path / "out"
    proc = cityseg("predict", "--run", run_id, "--runs", str(runs), str(images), "--out",
                   str(out), cwd=tmp_path)
    refused(proc, f"skipped: {images / 'b_bomb.png'}: not decoded: 90,000,000 pixels, over "
                  f"PIL's limit of 89,478,485 (PIL.Image.MAX_IMAGE_PIXELS")
    assert f"skipped: {images / 'd_text.png'}: unreadable (cannot identify" in proc.stderr
    assert "2 input(s) skipped" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png",
                                                      "c_mask.png", "c_overlay.png"]
    assert Image.open(out / "c_mask.png").size == (40, 24)  # the one after the bomb too
    assert_run_intact(runs, run_id)


def test_predict_out_that_is_a_file_is_a_clear_error(trained, tmp_path):
    runs, run_id = trained
    photo = tmp_path / "a.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(photo)
    taken = tmp_path / "results.png"
    taken.write_bytes(b"someone's file")
    proc = cityseg("predict", "--run", run_id, "--runs", str(runs), str(photo), "--out",
                   str(taken), cwd=tmp_path)
    refused(proc, f"error: --out {taken}: is a file; give a folder (created if missing)")
    assert taken.read_bytes() == b"someone's file"
    assert_run_intact(runs, run_id)


def test_a_16bit_greyscale_png_gives_the_same_mask_as_its_8bit_version(trained, tmp_path):
    runs, run_id = trained
    photo, _ = render_scene(np.random.default_rng(7), 48, 96)
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    out = tmp_path / "out"
    proc = cityseg("predict", "--run", run_id, "--runs", str(runs), str(tmp_path / "grey8.png"),
                   str(tmp_path / "grey16.png"), "--out", str(out), "--probabilities",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for kind in ("mask", "prob", "overlay"):
        eight, sixteen = (np.asarray(Image.open(out / f"grey{bits}_{kind}.png"))
                          for bits in (8, 16))
        np.testing.assert_array_equal(eight, sixteen, err_msg=kind)
    assert_run_intact(runs, run_id)
