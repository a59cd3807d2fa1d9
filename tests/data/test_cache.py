import errno
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cityseg.data import cache, cache_build
from cityseg.data.cache import load_or_build
from cityseg.data.datasets import (
    CachedReader,
    DataParams,
    DiskReader,
    SegmentationDataset,
    SyntheticParams,
    build_splits,
    task_lut,
)
from cityseg.data.layouts import index_dataset
from cityseg.data.synthetic import write_dataset
from cityseg.errors import ConfigError, DataError, StorageError

SIZE = (32, 64)


@pytest.fixture
def index(tmp_path):
    write_dataset(tmp_path / "data", num_train=4, num_val=1, size=(48, 96), seed=3)
    return index_dataset(tmp_path / "data")


def build(index, cache_dir, workers=0):
    return load_or_build(index.samples["train"], layout=index.layout, encoding=index.encoding,
                         size=SIZE, cache_dir=cache_dir, workers=workers)


def test_cache_holds_what_decoding_gives(index, tmp_path):
    decoded = build(index, tmp_path / "cache")
    disk = DiskReader(index.samples["train"], layout=index.layout, encoding=index.encoding,
                      size=SIZE)
    cached = CachedReader(decoded)
    assert len(cached) == len(disk) == 4
    counts = np.zeros(256, dtype=np.int64)
    for i in range(4):
        (a_img, a_ids), (b_img, b_ids) = disk[i], cached[i]
        assert np.array_equal(a_img, b_img) and np.array_equal(a_ids, b_ids)
        counts += np.bincount(a_ids.ravel(), minlength=256)
    assert np.array_equal(decoded.class_counts, counts)
    lut = task_lut(DataParams())
    x, y = SegmentationDataset(cached, lut=lut, transform=None)[2]
    assert y.shape == SIZE and x.shape == (3, *SIZE)


def test_second_use_reads_the_cache_without_decoding(index, tmp_path, monkeypatch):
    first = build(index, tmp_path / "cache")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "read_resized", no_decoding)
    again = build(index, tmp_path / "cache")
    assert again.path == first.path and again.fingerprint == first.fingerprint


def test_changed_input_or_size_rebuilds(index, tmp_path):
    first = build(index, tmp_path / "cache")
    mask = index.samples["train"][0].mask
    mask.write_bytes(mask.read_bytes())  # same content, new mtime
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    second = build(index, tmp_path / "cache")
    assert second.fingerprint != first.fingerprint
    other_size = load_or_build(index.samples["train"], layout=index.layout, encoding=index.encoding,
                               size=(16, 32), cache_dir=tmp_path / "cache", workers=0)
    assert other_size.fingerprint not in (first.fingerprint, second.fingerprint)


def _build_in_process(args):
    root, cache_dir = args
    index = index_dataset(root)
    return str(build(index, cache_dir).path)


def test_two_processes_building_at_once_agree_and_leave_no_temporaries(index, tmp_path):
    args = [(index.root, tmp_path / "cache")] * 2
    with ProcessPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(_build_in_process, args))
    assert paths[0] == paths[1]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir()]
    assert leftovers == [paths[0].rsplit("/", 1)[1]]


def test_parallel_build_equals_serial_build(index, tmp_path):
    serial = CachedReader(build(index, tmp_path / "a", workers=0))
    parallel = CachedReader(build(index, tmp_path / "b", workers=2))
    for i in range(4):
        assert all(np.array_equal(s, p) for s, p in zip(serial[i], parallel[i], strict=True))


@pytest.mark.parametrize("damage", ["truncate images", "edit manifest", "delete manifest"])
def test_a_damaged_cache_is_named_and_rebuilt(index, tmp_path, caplog, damage):
    first = build(index, tmp_path / "cache")
    expected = [np.array(a) for a in first.arrays()]
    if damage == "truncate images":
        images = first.path / "images.npy"
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "edit manifest":
        manifest = first.path / cache.MANIFEST
        manifest.write_text(manifest.read_text().replace('"count": 4', '"count": 5'))
    else:
        (first.path / cache.MANIFEST).unlink()
    with caplog.at_level("WARNING", logger="cityseg.data.cache"):
        again = build(index, tmp_path / "cache")
    assert "decode cache is corrupt" in caplog.text and str(first.path) in caplog.text
    assert again.path == first.path and again.count == 4
    for old, new in zip(expected, again.arrays(), strict=True):
        assert np.array_equal(old, new)


def test_flipped_mask_bytes_and_a_broken_header_are_named_when_the_cache_opens(index, tmp_path,
                                                                              caplog):
    first = build(index, tmp_path / "cache")
    expected = [np.array(a) for a in first.arrays()]
    for name, offset in (("masks.npy", -50), ("images.npy", 20)):  # data, then .npy header
        path = first.path / name
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF  # same size
        path.write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level("WARNING", logger="cityseg.data.cache"):
            again = build(index, tmp_path / "cache")
        assert "decode cache is corrupt" in caplog.text and str(path) in caplog.text
        for old, new in zip(expected, again.arrays(), strict=True):
            assert np.array_equal(old, new)


def test_a_cache_without_checksums_is_rebuilt_as_outdated(index, tmp_path, caplog):
    first = build(index, tmp_path / "cache")
    manifest_path = first.path / cache.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["crc32"], manifest["version"], manifest["checksum"]  # as version 2 wrote it
    manifest_path.write_text(json.dumps({**manifest, "checksum": cache._checksum(manifest)}))
    with caplog.at_level("WARNING", logger="cityseg.data.cache"):
        again = build(index, tmp_path / "cache")
    assert "decode cache is outdated" in caplog.text and "corrupt" not in caplog.text
    assert json.loads(manifest_path.read_text())["version"] == cache.MANIFEST_VERSION
    assert again.fingerprint == first.fingerprint  # the arrays and their key are unchanged


def test_the_estimate_is_what_a_build_writes(index, tmp_path):
    decoded = build(index, tmp_path / "cache")
    written = sum((decoded.path / name).stat().st_size for name in cache.ARRAYS)
    assert written == cache_build.estimate_bytes(4, SIZE)


def leftovers(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir() if ".tmp-" in p.name)


def test_a_disk_too_small_is_refused_with_the_numbers_before_anything_is_written(
        index, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_build.shutil, "disk_usage",
                        lambda path: usage._replace(free=10 * 2**20))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although it cannot fit")

    monkeypatch.setattr(cache, "read_resized", no_decoding)
    with pytest.raises(StorageError) as err:
        build(index, tmp_path / "cache")
    message = str(err.value)
    assert "data.cache_dir" in message and str(tmp_path / "cache") in message
    assert "needs 32.2 KiB" in message and "10.0 MiB is free" in message
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("where", ["reservation", "write", "fsync"])
def test_a_disk_that_fills_during_the_build_is_a_storage_error_and_leaves_nothing(
        index, tmp_path, monkeypatch, where):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "reservation":
        monkeypatch.setattr(cache_build.os, "posix_fallocate", full)
    elif where == "write":  # a disk that fills after the space was checked, reservation or not
        monkeypatch.setattr(cache_build.os, "posix_fallocate", lambda fd, offset, length: None)
        real_write, written = os.write, {"n": 0}

        def write(fd, data):
            written["n"] += 1
            return full() if written["n"] > 3 else real_write(fd, data)

        monkeypatch.setattr(cache_build.os, "write", write)
    else:
        monkeypatch.setattr(cache_build.os, "fsync", full)
    with pytest.raises(StorageError, match="No space left on device") as err:
        build(index, tmp_path / "cache")
    assert "data.cache_dir" in str(err.value) and ".npy" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def stopping(sample, *, real, stop, at, **kwargs):
    """Decodes like `real` until sample `at`, where `stop` happens (in a worker or not)."""
    if sample.image.name != at:
        return real(sample, **kwargs)
    if stop != "SIGTERM":
        raise stop("stopped at street 2")
    # no wait: in this process the handler raises at the next instruction; from a worker, the
    # main process handles the signal before this frame's result can reach it
    os.kill(os.getpid() if mp.parent_process() is None else os.getppid(), signal.SIGTERM)
    return real(sample, **kwargs)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, "SIGTERM", DataError])
def test_every_way_out_of_a_build_removes_its_temporary_folder(index, tmp_path, monkeypatch,
                                                              stop, workers):
    at = index.samples["train"][2].image.name
    monkeypatch.setattr(cache, "read_resized",
                        partial(stopping, real=cache.read_resized, stop=stop, at=at))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit if stop == "SIGTERM" else stop) as err:
        build(index, tmp_path / "cache", workers=workers)
    if stop == "SIGTERM":
        assert err.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert list((tmp_path / "cache").iterdir()) == []


def test_temporary_folders_of_dead_builders_are_removed_by_the_next_build(index, tmp_path,
                                                                        caplog):
    key = "0123456789abcdef0123"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"dead": f".{key}.tmp-{host}-{dead.pid}-abcdef12",
             "old format": f".{key}.tmp-{dead.pid}-12345678",
             "alive": f".{key}.tmp-{host}-{os.getpid()}-abcdef12",
             "elsewhere": f".{key}.tmp-other-host-{dead.pid}-abcdef12"}
    for name in names.values():
        (tmp_path / "cache" / name).mkdir(parents=True)
        (tmp_path / "cache" / name / "images.npy").write_bytes(b"half")
    with caplog.at_level("WARNING", logger="cityseg.data.cache"):
        build(index, tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == sorted([names["alive"], names["elsewhere"]])
    assert f"left by process {dead.pid}, which is gone" in caplog.text


def test_a_cache_dir_that_is_a_file_or_unwritable_is_a_storage_error(index, tmp_path,
                                                                     monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    for cache_dir, says in ((tmp_path / "file", "is a file, not a folder"),
                            (tmp_path / "file" / "cache", f"{tmp_path / 'file'} is a file")):
        with pytest.raises(StorageError, match="data.cache_dir") as err:
            build(index, cache_dir)
        assert says in str(err.value) and str(cache_dir) in str(err.value)
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):  # as for a folder of another user (tests run as root)
        if ".tmp-" in self.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(StorageError, match="cannot write in .*Permission denied.*data.cache_dir"):
        build(index, tmp_path / "cache")


def test_frames_a_build_holds_at_once_must_fit_in_memory(index, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_build, "_available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"data.num_workers: .* 4 workers .* 12 frames of "
                                          r"1000x1000 at once \(45.8 MiB\), and 1.0 MiB"):
        cache_build.check_fits(tmp_path, 10, (1000, 1000), 4)


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("image_size", (8192, 8192), True), ("image_size", (100000, 100000), False),
    ("scale", (1024, 8193), False), ("image_size", (0, 64), False)])
def test_image_sides_have_a_sane_upper_bound(field, value, ok):
    if ok:
        assert getattr(DataParams(**{field: value}), field) == value
    else:
        with pytest.raises(ValidationError, match=field):
            DataParams(**{field: value})
    with pytest.raises(ValidationError, match="at most 8192"):
        SyntheticParams(name="synthetic", source_size=(64, 9000))


def test_a_batch_larger_than_the_training_split_is_refused_before_any_cache(index, tmp_path):
    p = DataParams(batch_size=5, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.batch_size: 5 is more than the 4 images of the "
                                          "training split 'train'.*at most 4"):
        build_splits(p, index, train_split="train", val_split="val", train_transform=None,
                     seed=0)
    assert not (tmp_path / "cache").exists()
    splits = build_splits(p.model_copy(update={"batch_size": 4}), index, train_split="train",
                          val_split="val", train_transform=None, seed=0)
    assert len(splits.train) == 4
