import numpy as np
import pytest
from PIL import Image

from cityseg.data.cityscapes import (
    DEFAULT_FOREGROUND,
    LABEL_BY_NAME,
    LABELS,
    TRAIN_CLASSES,
    id_to_train_id_lut,
    official_samples,
)
from cityseg.data.datasets import DataParams, SegmentationDataset, task_lut
from cityseg.errors import DataError
from tests.conftest import CITYSCAPES_MINI


def test_label_table_matches_cityscapes():
    assert len(TRAIN_CLASSES) == 19
    assert TRAIN_CLASSES[0] == "road" and TRAIN_CLASSES[13] == "car" and TRAIN_CLASSES[18] == "bicycle"
    assert len({label.id for label in LABELS}) == len(LABELS)  # ids are unique
    lut = id_to_train_id_lut()
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255 and lut[29] == 255


def test_missing_mask_is_reported_with_its_path(tmp_path):
    image_dir = tmp_path / "leftImg8bit" / "train" / "x"
    image_dir.mkdir(parents=True)
    (tmp_path / "gtFine" / "train" / "x").mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(image_dir / "x_000000_000019_leftImg8bit.png")
    with pytest.raises(DataError, match="x_000000_000019_gtFine_labelIds.png"):
        official_samples(tmp_path, "train")


def test_missing_split_folder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError, match="leftImg8bit/val/<city>"):
        official_samples(tmp_path, "val")


def test_size_mismatch_is_reported_with_both_paths(tmp_path):
    for folder, name, img in (("leftImg8bit", "a_leftImg8bit.png", Image.new("RGB", (8, 4))),
                              ("gtFine", "a_gtFine_labelIds.png", Image.new("L", (6, 4)))):
        (tmp_path / folder / "train" / "c").mkdir(parents=True)
        img.save(tmp_path / folder / "train" / "c" / name)
    dataset = SegmentationDataset(official_samples(tmp_path, "train"), size=(4, 8),
                                  lut=task_lut(DataParams()), transform=None)
    with pytest.raises(DataError, match="a_gtFine_labelIds.png: mask size"):
        dataset[0]


@pytest.mark.skipif(not CITYSCAPES_MINI.is_dir(), reason="../shared/data/cityscapes-mini is absent")
def test_reads_real_cityscapes_frames():
    train = official_samples(CITYSCAPES_MINI, "train")
    val = official_samples(CITYSCAPES_MINI, "val")
    assert (len(train), len(val)) == (6, 2)
    fg_ids = [LABEL_BY_NAME[name].id for name in DEFAULT_FOREGROUND]
    dataset = SegmentationDataset(val, size=(1024, 2048), lut=task_lut(DataParams()), transform=None)
    for i, sample in enumerate(val):
        image, mask = dataset[i]
        assert image.shape == (3, 1024, 2048)
        ids = np.asarray(Image.open(sample.mask))
        valid = id_to_train_id_lut()[ids] != 255
        expected = np.isin(ids, fg_ids)[valid].mean()  # direct count from the official ids
        m = mask.numpy()
        assert (m[m != 255] == 1).mean() == pytest.approx(expected)
        assert 0.0 < expected < 0.2
