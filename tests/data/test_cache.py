from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from cityseg.data import cache
from cityseg.data.cache import load_or_build
from cityseg.data.datasets import (
    CachedReader,
    DataParams,
    DiskReader,
    SegmentationDataset,
    task_lut,
)
from cityseg.data.layouts import index_dataset
from cityseg.data.synthetic import write_dataset

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
    import os
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
