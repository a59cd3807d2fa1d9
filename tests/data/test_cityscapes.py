import numpy as np
import pytest

from cityseg.data.cityscapes import (
    LABELS,
    TRAIN_CLASSES,
    class_frequencies,
    foreground_stats,
    id_colors,
    id_to_train_id_lut,
    nearest_palette,
    train_id_to_binary_lut,
    train_ids_lut,
    valid_values,
)
from tests.conftest import CITYSCAPES_MINI


def test_label_table_matches_cityscapes():
    assert len(TRAIN_CLASSES) == 19
    assert (TRAIN_CLASSES[0] == "road" and TRAIN_CLASSES[13] == "car"
            and TRAIN_CLASSES[18] == "bicycle")
    assert len({label.id for label in LABELS}) == len(LABELS)  # ids are unique
    lut = id_to_train_id_lut()
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255 and lut[29] == 255


def test_binary_lut_foreground_background_and_ignore():
    lut = train_id_to_binary_lut(["car", "person"])
    assert lut[13] == 1 and lut[11] == 1 and lut[0] == 0 and lut[18] == 0 and lut[255] == 255
    with pytest.raises(ValueError, match="not Cityscapes train classes"):
        train_id_to_binary_lut(["cars"])


def test_exact_colours_decode_to_the_train_ids_of_their_labels():
    ids = np.array([[label.id for label in LABELS if label.id >= 0]], dtype=np.uint8)
    train_ids, distance = nearest_palette(id_colors()[ids])
    assert (distance == 0).all()
    # polegroup shares pole's colour and maps to pole; every other id keeps its train id
    expected = id_to_train_id_lut()[ids]
    expected[ids == 18] = 5
    assert np.array_equal(train_ids, expected)


def test_nearly_right_colours_go_to_the_nearest_label():
    car, road = (0, 0, 142), (128, 64, 128)
    noisy = np.array([[[3, 2, 139], [125, 70, 131]]], dtype=np.uint8)
    train_ids, distance = nearest_palette(noisy)
    assert train_ids.tolist() == [[13, 0]]
    assert distance[0, 0] == pytest.approx(np.linalg.norm(np.subtract((3, 2, 139), car)))
    assert distance[0, 1] == pytest.approx(np.linalg.norm(np.subtract((125, 70, 131), road)))


def test_single_channel_encodings():
    assert train_ids_lut("ids")[26] == 13 and train_ids_lut("train_ids")[13] == 13
    assert train_ids_lut("train_ids")[40] == 255
    assert valid_values("ids")[33] and not valid_values("ids")[34]
    assert valid_values("train_ids")[255] and not valid_values("train_ids")[19]


def test_foreground_stats_by_hand():
    counts = np.zeros(256, dtype=np.int64)
    counts[0], counts[13], counts[11], counts[255] = 70, 20, 10, 500  # road, car, person, ignored
    fraction, ratio = foreground_stats(counts, ["car", "person"])
    assert fraction == pytest.approx(30 / 100) and ratio == pytest.approx(70 / 30)
    assert foreground_stats(counts, ["bus"]) == (0.0, float("inf"))


@pytest.mark.skipif(not CITYSCAPES_MINI.is_dir(), reason="../shared/data/cityscapes-mini is absent")
def test_training_loader_reads_real_frames():
    from cityseg.data.datasets import DataParams, DiskReader, SegmentationDataset, task_lut
    from cityseg.data.layouts import index_dataset

    index = index_dataset(CITYSCAPES_MINI)
    reader = DiskReader(index.samples["val"], layout=index.layout, encoding=index.encoding,
                        size=(256, 512))
    image, mask = SegmentationDataset(reader, lut=task_lut(DataParams()), transform=None)[0]
    assert image.shape == (3, 256, 512) and mask.shape == (256, 512)
    assert set(mask.unique().tolist()) == {0, 1, 255}  # background, vehicles/persons, void


def test_class_frequencies_are_shares_of_the_labelled_pixels():
    counts = np.zeros(256, dtype=np.int64)
    counts[0], counts[13], counts[255] = 30, 10, 60  # road, car, ignored
    found = class_frequencies(counts)
    assert found["ignored_pixels"] == 60 and found["labelled_pixels"] == 40
    assert list(found["classes"]) == list(TRAIN_CLASSES)
    assert found["classes"]["road"] == {"pixels": 30, "frequency": 0.75}
    assert found["classes"]["car"] == {"pixels": 10, "frequency": 0.25}
    assert found["classes"]["sky"] == {"pixels": 0, "frequency": 0.0}
    assert class_frequencies(np.zeros(256, dtype=np.int64))["classes"]["road"]["frequency"] == 0.0


def test_train_ids_map_back_to_the_official_ids_cityscapesscripts_gives():
    from cityscapesscripts.helpers.labels import trainId2label

    from cityseg.data.cityscapes import id_to_train_id_lut, train_id_to_id_lut

    back, forth = train_id_to_id_lut(), id_to_train_id_lut()
    for train_id in range(19):  # the official table: the independent reference
        assert back[train_id] == trainId2label[train_id].id
        assert forth[back[train_id]] == train_id
