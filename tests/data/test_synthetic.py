import numpy as np
import pytest
from PIL import Image

from cityseg.data.cityscapes import LABELS, id_to_train_id_lut
from cityseg.data.datasets import DataParams, DiskReader, SegmentationDataset, task_lut
from cityseg.data.layouts import index_dataset
from cityseg.data.synthetic import ensure_dataset, render_scene, write_dataset
from cityseg.errors import DataError

OFFICIAL_IDS = {label.id for label in LABELS if label.id >= 0}


def test_same_seed_same_scene_and_different_seeds_differ():
    a = render_scene(np.random.default_rng([1, 0, 3]), 64, 128)
    b = render_scene(np.random.default_rng([1, 0, 3]), 64, 128)
    c = render_scene(np.random.default_rng([2, 0, 3]), 64, 128)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_scenes_hold_street_classes_with_official_ids():
    seen = set()
    for i in range(8):
        photo, ids = render_scene(np.random.default_rng([0, 0, i]), 64, 128)
        assert photo.shape == (64, 128, 3) and photo.dtype == np.uint8
        assert ids.shape == (64, 128)
        seen |= set(np.unique(ids).tolist())
    assert seen <= OFFICIAL_IDS
    by_name = {label.name: label.id for label in LABELS}
    for name in ("sky", "building", "road", "sidewalk", "vegetation", "pole", "car", "person"):
        assert by_name[name] in seen, name


def test_loader_reads_what_the_generator_writes(tmp_path):
    write_dataset(tmp_path, num_train=3, num_val=2, size=(32, 64), seed=5)
    index = index_dataset(tmp_path)
    train = index.samples["train"]
    assert len(train) == 3 and len(index.samples["val"]) == 2
    lut = task_lut(DataParams())
    reader = DiskReader(train, layout=index.layout, encoding=index.encoding, size=(32, 64))
    dataset = SegmentationDataset(reader, lut=lut, transform=None)
    for i, sample in enumerate(train):
        photo, ids = render_scene(np.random.default_rng([5, 0, i]), 32, 64)
        assert np.array_equal(np.asarray(Image.open(sample.mask)), ids)  # lossless PNG ids
        assert np.array_equal(np.asarray(Image.open(sample.image)), photo)
        image, mask = dataset[i]
        assert image.shape == (3, 32, 64) and mask.shape == (32, 64)
        assert np.array_equal(mask.numpy(), lut[id_to_train_id_lut()[ids]])


def test_ensure_dataset_generates_once_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "synth"
    assert ensure_dataset(root, num_train=2, num_val=1, size=(16, 32), seed=0) is True
    assert ensure_dataset(root, num_train=2, num_val=1, size=(16, 32), seed=0) is False
    # spec changed
    assert ensure_dataset(root, num_train=3, num_val=1, size=(16, 32), seed=0) is True
    assert len(index_dataset(root).samples["train"]) == 3
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="not a synthetic dataset"):
        ensure_dataset(tmp_path / "mine", num_train=1, num_val=1, size=(16, 32), seed=0)
