"""Every layout and mask encoding, written by the project itself, loads to the source labels."""

import numpy as np
import pytest
from PIL import Image

from cityseg.data.cityscapes import id_to_train_id_lut
from cityseg.data.layouts import detect_layout, index_dataset, read_resized, read_sample
from cityseg.data.synthetic import SPLIT_OFFSETS, render_scene, write_dataset
from cityseg.errors import DataError

SIZE = (96, 192)
CASES = [  # layout, mask encoding, swapped channels, JPEG quality
    ("official", "ids", False, 0), ("official", "train_ids", False, 0),
    ("official", "color", False, 0),
    ("folders", "ids", False, 0), ("folders", "train_ids", False, 0),
    ("folders", "color", False, 0),
    ("folders", "color", True, 0), ("folders", "color", False, 90), ("folders", "color", True, 90),
    ("pairs", "color", False, 0), ("pairs", "color", True, 0), ("pairs", "color", False, 90),
]


def source_train_ids(split: str, i: int) -> np.ndarray:
    _, ids = render_scene(np.random.default_rng([1, SPLIT_OFFSETS[split], i]), *SIZE)
    return id_to_train_id_lut()[ids]


@pytest.mark.parametrize("layout,mask,bgr,jpeg", CASES)
def test_every_layout_and_encoding_loads_the_source_labels(tmp_path, layout, mask, bgr, jpeg):
    write_dataset(tmp_path, num_train=3, num_val=2, size=SIZE, seed=1, layout=layout, mask=mask,
                  bgr=bgr, jpeg_quality=jpeg)
    index = index_dataset(tmp_path)  # layout and encoding detected
    assert index.layout == layout and index.layout_how == "detected"
    assert index.encoding.kind == ("color" if layout == "pairs" else mask)
    if index.encoding.kind == "color":
        assert index.encoding.channel_order == ("bgr" if bgr else "rgb")
    assert not index.problems
    for split, count in (("train", 3), ("val", 2)):
        assert len(index.samples[split]) == count
        for i, sample in enumerate(index.samples[split]):
            photo, train_ids = read_sample(sample, layout=index.layout, encoding=index.encoding)
            assert photo.shape == (*SIZE, 3)
            agreement = (train_ids == source_train_ids(split, i)).mean()
            if jpeg:  # compression moves colours at edges; nearest-palette recovers the rest
                assert agreement > 0.95, agreement
            else:
                assert agreement == 1.0


def test_layout_can_be_given_instead_of_detected(tmp_path):
    write_dataset(tmp_path, num_train=1, num_val=1, size=SIZE, seed=1, layout="folders", mask="ids")
    index = index_dataset(tmp_path, layout="folders")
    assert (index.layout, index.layout_how) == ("folders", "given")


def test_unknown_folder_lists_the_expected_layouts(tmp_path):
    (tmp_path / "train" / "something").mkdir(parents=True)
    with pytest.raises(DataError,
                       match="(?s)no Cityscapes layout found.*official:.*folders:.*pairs:"):
        detect_layout(tmp_path)


def test_unpaired_files_are_listed_with_their_paths(tmp_path):
    write_dataset(tmp_path, num_train=3, num_val=1, size=SIZE, seed=1, layout="folders", mask="ids")
    orphan_image = sorted((tmp_path / "train" / "img").iterdir())[0]
    (tmp_path / "train" / "label" / orphan_image.name).unlink()
    Image.new("L", (8, 8)).save(tmp_path / "train" / "label" / "lonely.png")
    index = index_dataset(tmp_path)
    problems = {str(p) for p in index.problems}
    assert f"{orphan_image}: image without mask" in problems
    assert f"{tmp_path / 'train' / 'label' / 'lonely.png'}: mask without image" in problems
    assert len(index.samples["train"]) == 2


def test_read_resized_uses_nearest_for_labels(tmp_path):
    write_dataset(tmp_path, num_train=1, num_val=1, size=SIZE, seed=1)
    index = index_dataset(tmp_path)
    photo, train_ids = read_resized(index.samples["train"][0], layout="official",
                                    encoding=index.encoding, size=(48, 96))
    assert photo.shape == (48, 96, 3) and train_ids.shape == (48, 96)
    assert set(np.unique(train_ids)) <= set(np.unique(source_train_ids("train", 0)))
