"""Faults in the decode cache: a disk too small or filling up, SIGTERM and kill -9 while it is
built, damage that keeps a file's size, a cache_dir that is a file, sizes too large to
allocate. Real `cityseg run` processes; hooks (a sitecustomize.py on PYTHONPATH, switched on
by CITYSEG_TEST_CACHE_FAULT) inject what a test cannot cause. Where the tests run as root and
may mount, the disk that fills is a real 32 KiB tmpfs and the ENOSPC is the kernel's."""

import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from cityseg.config import load_experiment
from cityseg.errors import ConfigError
from cityseg.train.build import build_data
from cityseg.train.display import NullDisplay
from tests.conftest import QUICKSTART, runs_of, tiny_overrides

HOOKS = '''
import os
fault = os.environ.get("CITYSEG_TEST_CACHE_FAULT", "")
if fault:
    import errno, shutil, time
    from cityseg.data import cache, cache_build

    real_usage = shutil.disk_usage

    def disk_usage(path, free=int(os.environ.get("CITYSEG_TEST_FREE", "0"))):
        usage = real_usage(path)
        return usage._replace(free=free) if free else usage

    shutil.disk_usage = disk_usage  # the free space the build is told about
    if "no-reservation" in fault:  # a file system where posix_fallocate is not available
        cache_build._reserve = lambda fd, length: None
    if "enospc" in fault and "no-reservation" not in fault:  # posix_fallocate finds it full
        real_fallocate = os.posix_fallocate

        def posix_fallocate(fd, offset, length):
            if ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fallocate(fd, offset, length)

        os.posix_fallocate = posix_fallocate
    if "enospc" in fault and "no-reservation" in fault:  # write(2) fills it, frames in
        real_write, written = os.write, [0]

        def write(fd, data):
            if ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
                written[0] += len(data)
                if written[0] > 20_000:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        os.write = write
    if "slow" in fault:  # every frame takes a while, so a signal lands mid-build
        real_read = cache.read_resized

        def slow_read(*args, **kwargs):
            time.sleep(0.3)  # a slower decoder, not a wait: a signal then lands mid-build
            decoded = real_read(*args, **kwargs)
            with open(os.environ["CITYSEG_TEST_PROGRESS"], "a") as progress:
                progress.write("frame\\n")  # what a test waits on before it signals
            return decoded

        cache.read_resized = slow_read
'''


def cityseg_run(tmp_path, settings, *, fault="", free=0, wait=True):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    command = [sys.executable, "-m", "cityseg", "run", str(QUICKSTART),
               *sum((["--set", s] for s in settings), [])]
    env = {**os.environ, "PYTHONPATH": str(hooks), "CITYSEG_TEST_CACHE_FAULT": fault,
           "CITYSEG_TEST_FREE": str(free), "CITYSEG_TEST_PROGRESS": str(progress(tmp_path))}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def progress(tmp_path):
    """The file a slowed build adds a line to per frame decoded."""
    return tmp_path / "hooks" / "frames-decoded"


def frames_decoded(tmp_path) -> int:
    found = progress(tmp_path)
    return len(found.read_text().splitlines()) if found.exists() else 0


def assert_trains_and_finishes(tmp_path, settings):
    """The documented recovery (run it again): it trains, FINISHED, one value per epoch."""
    code, _, err = cityseg_run(tmp_path, settings)
    assert code == 0, err
    client, (run,) = runs_of(tmp_path / "runs")
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "val/dice"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    return err


def temporaries(cache_dir):
    return sorted(p.name for p in cache_dir.glob(".*.tmp-*")) if cache_dir.is_dir() else []


def assert_refused_before_the_run(tmp_path, code, err, *words):
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) <= 10, err
    for word in words:
        assert word in err, err
    assert runs_of(tmp_path / "runs")[1] == []  # the run had not opened: none is left RUNNING


def test_a_disk_too_small_for_the_cache_is_refused_with_the_numbers(tmp_path, small_disk):
    folder, real = small_disk
    settings = [*tiny_overrides(tmp_path), f"data.cache_dir={folder / 'cache'}"]
    code, _, err = cityseg_run(tmp_path, settings, fault="" if real else "small",
                               free=0 if real else 32 * 1024)
    assert_refused_before_the_run(tmp_path, code, err, "data.cache_dir", str(folder / "cache"),
                                  "needs 48.2 KiB", "is free there")
    assert temporaries(folder / "cache") == []


@pytest.mark.parametrize("when", ["reserving", pytest.param("writing", marks=pytest.mark.slow)])
def test_a_disk_that_fills_while_the_cache_is_built_is_exit_2_and_leaves_nothing(
        tmp_path, small_disk, when):
    folder, real = small_disk
    settings = [*tiny_overrides(tmp_path), f"data.cache_dir={folder / 'cache'}"]
    # the build is told the cache fits; then the tmpfs (real) or the hook says ENOSPC, when
    # the files are reserved, or where posix_fallocate is unavailable, once frames are written
    fault = "told-it-fits" + ("" if real else "-enospc")
    fault += "-no-reservation" if when == "writing" else ""
    code, _, err = cityseg_run(tmp_path, settings, fault=fault, free=2**40)
    assert_refused_before_the_run(tmp_path, code, err, "data.cache_dir",
                                  "No space left on device", ".npy")
    assert "Bus error" not in err and temporaries(folder / "cache") == []
    if when == "writing":  # after freeing space (here: a larger disk), it trains
        assert_trains_and_finishes(tmp_path, tiny_overrides(tmp_path))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_while_the_cache_builds_removes_its_temporary_folder(tmp_path, workers):
    settings = [*tiny_overrides(tmp_path), f"data.num_workers={workers}"]
    proc = cityseg_run(tmp_path, settings, fault="slow", wait=False)
    deadline = time.time() + 120
    while not (temporaries(tmp_path / "cache") and frames_decoded(tmp_path) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)  # polled: the build has begun, some frames in
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "SIGTERM while building the decode cache" in err
    assert temporaries(tmp_path / "cache") == [] and runs_of(tmp_path / "runs")[1] == []
    if workers:
        assert_trains_and_finishes(tmp_path, settings)


@pytest.mark.slow  # about 21 s on two quiet cores: `make test-slow`
def test_kill_9_while_the_cache_builds_leaves_a_folder_the_next_build_removes(tmp_path):
    settings = tiny_overrides(tmp_path)
    proc = cityseg_run(tmp_path, settings, fault="slow", wait=False)
    deadline = time.time() + 120
    while not temporaries(tmp_path / "cache"):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = temporaries(tmp_path / "cache")
    assert f"-{proc.pid}-" in left and runs_of(tmp_path / "runs")[1] == []
    err = assert_trains_and_finishes(tmp_path, settings)
    assert f"left by process {proc.pid}, which is gone" in err
    assert temporaries(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["flipped mask bytes", "broken images header"])
def test_a_damaged_cache_is_named_rebuilt_and_trained_on(tmp_path, damage):
    settings = tiny_overrides(tmp_path)
    build_data(load_experiment(QUICKSTART, settings), NullDisplay())  # caches both splits
    largest = max((tmp_path / "cache").iterdir(),  # the training split's
                  key=lambda p: (p / "images.npy").stat().st_size)
    name = "masks.npy" if damage == "flipped mask bytes" else "images.npy"
    path = largest / name
    intact = path.read_bytes()
    data = bytearray(intact)
    offset = len(data) - 1000 if name == "masks.npy" else 30  # in the data; in the header
    data[offset : offset + 8] = bytes(b ^ 0x5A for b in data[offset : offset + 8])
    path.write_bytes(bytes(data))  # same size
    err = assert_trains_and_finishes(tmp_path, settings)
    assert "decode cache is corrupt" in err and str(path) in err and "Traceback" not in err
    assert path.read_bytes() == intact  # rebuilt as it was
    assert np.load(path, mmap_mode="r").shape[0] == 6


def test_a_cache_dir_that_is_a_file_is_exit_2_naming_it(tmp_path):
    (tmp_path / "cache-file").write_text("not a folder")
    settings = [*tiny_overrides(tmp_path), f"data.cache_dir={tmp_path / 'cache-file'}"]
    code, _, err = cityseg_run(tmp_path, settings)
    assert_refused_before_the_run(tmp_path, code, err, "data.cache_dir",
                                  str(tmp_path / "cache-file"), "is a file, not a folder")


def test_an_image_size_too_large_is_refused_before_anything_is_written(tmp_path):
    settings = [*tiny_overrides(tmp_path), "data.image_size=[100000,100000]"]
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="data.image_size: each side must be at most 8192"):
            load_experiment(QUICKSTART, settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # refused by validation: nothing of the 30 GB a frame would take
    code, _, err = cityseg_run(tmp_path, settings)
    assert_refused_before_the_run(tmp_path, code, err, "data.image_size", "at most 8192")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hooks"]  # nothing written


def test_a_batch_larger_than_the_training_split_is_exit_2_before_any_cache(tmp_path):
    settings = [*tiny_overrides(tmp_path), "data.batch_size=8"]  # 6 training scenes
    code, _, err = cityseg_run(tmp_path, settings)
    assert_refused_before_the_run(tmp_path, code, err, "data.batch_size: 8",
                                  "6 images of the training split", "at most 6")
    assert not (tmp_path / "cache").exists()
