"""Edges found under attack (issue 32): each is refused with exit 2 and a message naming the
file or field, with no traceback, or behaves as documented; nothing half-written is left."""

import errno
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cityseg.config import load_experiment
from cityseg.config.errors import MAX_LINES
from cityseg.config.loading import BASE_MAX_DEPTH
from cityseg.data.synthetic import render_scene
from cityseg.runtime.files import partial_path, sqlite_path, sqlite_uri
from cityseg.train import runner
from tests.conftest import NO_MODEL, QUICKSTART, cityseg_here, runs_of, tiny_overrides, wait_for


def refused(args: list[str], *messages: str) -> str:
    code, _, err = cityseg_here(*args)
    assert code == 2, err
    assert "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    return err


# ---------------------------------------------------------------- experiment files


@pytest.mark.parametrize("files", [BASE_MAX_DEPTH + 1, 1000])
def test_a_long_base_chain_is_refused_at_its_limit(tmp_path, files):
    (tmp_path / "f0.yaml").write_text(f"base: {QUICKSTART}\n")
    for i in range(1, files):
        (tmp_path / f"f{i}.yaml").write_text(f"base: f{i - 1}.yaml\n")
    last = tmp_path / f"f{files - 1}.yaml"
    refused(["validate", str(last)], f"{last}: its `base` chain is longer than {BASE_MAX_DEPTH}")
    # a chain of the limit's length loads (f0 ... f30 and the quickstart: 32 files)
    assert cityseg_here("validate", str(tmp_path / f"f{BASE_MAX_DEPTH - 2}.yaml"))[0] == 0


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_a_base_that_is_not_a_regular_file_says_so(tmp_path, kind):
    target = {"device": "/dev/zero", "fifo": str(tmp_path / "pipe"), "folder": str(tmp_path)}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {target}\nname: x\n")
    err = refused(["validate", str(exp)], f"base file (included by {exp.resolve()}) is ")
    assert ("a folder" if kind == "folder" else "not a regular file") in err
    assert "not found" not in err


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {QUICKSTART}\nseed: 1\nmodel:\n  depth: 2\nseed: 2\n")
    refused(["validate", str(exp)], f"{exp}: refused at line 5, column 1: duplicate key 'seed' "
                                    f"(first at line 2)")
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"base: {QUICKSTART}\nmodel:\n  depth: 2\n  depth: 3\n")
    refused(["validate", str(nested)], "line 4, column 3: duplicate key 'depth' (first at line 3)")
    # a YAML merge key may still override what it merges
    merged = tmp_path / "merged.yaml"
    merged.write_text(f"base: {QUICKSTART}\nshared: &s {{depth: 2}}\nmodel:\n  <<: *s\n"
                      f"  depth: 3\n")
    code, _, err = cityseg_here("validate", str(merged))
    assert "duplicate" not in err


def test_thousands_of_unknown_keys_fit_one_screen(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {QUICKSTART}\n" + "".join(f"knob_{i}: 1\n" for i in range(2000)))
    err = refused(["validate", str(exp)], f"{exp}: 2000 errors", "knob_0: unknown key",
                  f"and {2000 - MAX_LINES + 1:,} more")
    assert len(err.splitlines()) <= MAX_LINES + 6


# ---------------------------------------------------------------- store addresses


def test_a_tracking_dir_with_url_characters_holds_its_own_store(tmp_path):
    # `?`, `#` and `%` in a folder's name are the folder's, not a query on another file
    runs = tmp_path / "runs#1?mode=ro%41"
    (tmp_path / "runs#1").write_text("an existing file the unescaped address would open")
    code, _, err = cityseg_here("run", str(QUICKSTART), *sum(
        (["--set", o] for o in tiny_overrides(tmp_path, epochs=1)), []),
        "--set", f"tracking.dir={runs}", "--set", "tracking.log_model=false")
    assert code == 0, err
    assert (runs / "mlflow.db").is_file() and (runs / "artifacts").is_dir()
    assert (tmp_path / "runs#1").read_text().startswith("an existing file")
    code, out, err = cityseg_here("compare", "--runs", str(runs))
    assert code == 0 and "quickstart" in out, err
    # Optuna's study beside it: the same address rules
    assert sqlite_path(sqlite_uri(runs / "optuna.db")) == runs / "optuna.db"


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_whole_process_group_stops_the_run_at_a_checkpoint(tmp_path, sig):
    # what `timeout`, Slurm's scancel and a closing terminal send: the DataLoader workers get
    # it too, and leave the stop to the main process
    overrides = [*tiny_overrides(tmp_path, epochs=40), NO_MODEL, "data.num_workers=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityseg.cli", "run", str(QUICKSTART),
         *sum((["--set", o] for o in overrides), [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = tmp_path / "runs" / "checkpoints"
    wait_for(proc, lambda: list(checkpoints.glob("*/last.pt")))
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"{signal.Signals(sig).name}: stopped at " in err and "Traceback" not in err
    assert "resume with: cityseg run" in err
    _, (run,) = runs_of(tmp_path / "runs")
    assert run.info.status == "KILLED"


# ---------------------------------------------------------------- what predict and export write


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-epoch quickstart run to predict and export with."""
    tmp = tmp_path_factory.mktemp("trained")
    result = runner.run(load_experiment(QUICKSTART, [*tiny_overrides(tmp, epochs=1), NO_MODEL]))
    return tmp / "runs", result.run_id


def test_predict_turns_a_photo_as_its_exif_orientation_says(trained_run, tmp_path):
    runs, run_id = trained_run
    photo = render_scene(np.random.default_rng(0), 64, 128)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(photo).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(photo).rotate(-90, expand=True).save(tmp_path / "upright.jpg", quality=95)
    code, _, err = cityseg_here("predict", "--run", run_id, "--runs", str(runs),
                                str(tmp_path / "turned.jpg"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    with Image.open(tmp_path / "o" / "turned_mask.png") as mask:
        assert mask.size == (64, 128)  # (width, height): upright, as viewers show it


def test_predict_never_writes_through_a_link_in_out(trained_run, tmp_path):
    runs, run_id = trained_run
    photo = render_scene(np.random.default_rng(1), 64, 128)[0]
    Image.fromarray(photo).save(tmp_path / "frame.png")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not to be touched")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "frame_mask.png").symlink_to(outside)
    code, _, err = cityseg_here("predict", "--run", run_id, "--runs", str(runs),
                                str(tmp_path / "frame.png"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert outside.read_bytes() == b"not to be touched"
    written = tmp_path / "o" / "frame_mask.png"
    assert not written.is_symlink() and Image.open(written).size == (128, 64)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_to_a_folder_it_cannot_write_is_refused_and_leaves_nothing(trained_run, tmp_path,
                                                                         fmt):
    runs, run_id = trained_run
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere but in /proc
        folder = Path("/proc")
    out = folder / f"m.{fmt}"
    try:
        refused(["export", "--run", run_id, "--runs", str(runs), "--format", fmt,
                 "--out", str(out)], f"--out {out}: cannot write")
        assert not out.exists() and not partial_path(out).exists()
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_to_a_full_disk_is_refused_and_leaves_nothing(trained_run, small_disk, fmt,
                                                             monkeypatch):
    # a real 32 KiB tmpfs where the tests may mount one (torch's own writer aborted the whole
    # process on it), else ENOSPC as the write meets it
    runs, run_id = trained_run
    folder, real = small_disk
    if not real:
        write = Path.write_bytes

        def full(self, data):
            write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Path, "write_bytes", full)
    out = folder / f"m.{fmt}"
    refused(["export", "--run", run_id, "--runs", str(runs), "--format", fmt, "--out", str(out)],
            f"--out {out}: cannot write (No space left on device)")
    assert list(folder.iterdir()) == []


def test_sigterm_stops_predict_and_leaves_no_unfinished_file(trained_run, tmp_path):
    runs, run_id = trained_run
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(300):
        Image.fromarray(render_scene(np.random.default_rng(i), 64, 128)[0]).save(
            photos / f"f{i:03d}.png")
    out = tmp_path / "o"
    out.mkdir()
    leftover = out / ".f000_overlay.png.part"  # what a kill -9 left: the next predict removes it
    leftover.write_bytes(b"half")
    proc = subprocess.Popen([sys.executable, "-m", "cityseg.cli", "predict", "--run", run_id,
                             "--runs", str(runs), str(photos), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, lambda: len(list(out.glob("*_mask.png"))) >= 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopped" in err and "Traceback" not in err
    assert not list(out.glob(".*.part")) and not leftover.exists()
    for mask in out.glob("*_mask.png"):  # every file there is whole
        Image.open(mask).load()


# ---------------------------------------------------------------- files that hold code


class Payload:
    """Unpickled, it would create a folder: proof that it ran."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.mkdir, (str(self.proof),))


def test_a_raw_pickle_and_a_pt2_with_a_pickle_added_are_refused_as_such(trained_run, tmp_path):
    runs, run_id = trained_run
    proof = tmp_path / "it-ran"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"config": Payload(proof), "state": {}}, protocol=4))
    pt2 = tmp_path / "model.pt2"
    assert cityseg_here("export", "--run", run_id, "--runs", str(runs), "--format", "pt2",
                        "--out", str(pt2))[0] == 0
    with zipfile.ZipFile(pt2, "a") as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/data.pkl", pickle.dumps(Payload(proof), protocol=4))
    for path in (raw, pt2):
        err = refused(["evaluate", "--checkpoint", str(path), "--no-log"],
                      f"{path}: holds Python objects", "cityseg does not load it")
        assert "corrupt" not in err and not proof.exists()
    # a checkpoint cut short is still said to be cut short
    whole = next((runs / "checkpoints").glob("*/best.pt")).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])
    refused(["evaluate", "--checkpoint", str(cut), "--no-log"], "truncated or corrupt")
