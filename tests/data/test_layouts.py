"""Every layout and mask encoding, written by the project itself, loads to the source labels;
photos of every PIL mode read as 8-bit RGB, and files that should not be decoded are refused."""

import warnings

import numpy as np
import pytest
from PIL import Image

from cityseg.data.cityscapes import id_to_train_id_lut
from cityseg.data.layouts import (
    detect_layout,
    index_dataset,
    photo_rgb,
    read_photo,
    read_resized,
    read_sample,
)
from cityseg.data.synthetic import SPLIT_OFFSETS, render_scene, write_dataset
from cityseg.errors import DataError
from tests.conftest import png_header

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


RGB = np.random.default_rng(3).integers(0, 256, (6, 10, 3), dtype=np.uint8)
GREY = RGB[..., 0]
ALPHA = np.random.default_rng(4).integers(0, 256, (6, 10), dtype=np.uint8)
PALETTED = Image.fromarray(RGB).quantize(8)
CMYK = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255]]], np.uint8)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def palette_colours(image: Image.Image) -> np.ndarray:
    return np.array(image.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(image)]


MODES = {  # name: (image as saved, file type, expected RGB), each worked out by hand
    "L": (Image.fromarray(GREY), "png", grey_rgb(GREY)),
    "I;16": (Image.fromarray(GREY.astype(np.uint16) * 257), "png", grey_rgb(GREY)),
    "I": (Image.fromarray(GREY.astype(np.int32) * 257), "tiff", grey_rgb(GREY)),
    "P": (PALETTED, "png", palette_colours(PALETTED)),
    "P with transparency": (PALETTED, "png-trns", palette_colours(PALETTED)),
    "1": (Image.fromarray(GREY > 127), "png", grey_rgb((GREY > 127).astype(np.uint8) * 255)),
    "CMYK": (Image.fromarray(CMYK, mode="CMYK"), "tiff",  # white, cyan, magenta, black
             np.array([[[255, 255, 255], [0, 255, 255], [255, 0, 255], [0, 0, 0]]], np.uint8)),
    "LA": (Image.fromarray(np.stack([GREY, ALPHA], -1), mode="LA"), "png", grey_rgb(GREY)),
    "RGBA": (Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA"), "png", RGB),
}


@pytest.mark.parametrize("name", MODES)
def test_photos_of_every_mode_read_as_8bit_rgb(tmp_path, name):
    image, kind, expected = MODES[name]
    path = tmp_path / f"photo.{kind.split('-')[0]}"
    image.save(path, **({"transparency": bytes([0, 128, *[255] * 6])} if "trns" in kind else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning about palette transparency either
        photo = read_photo(path)
    assert Image.open(path).mode == name.split()[0]  # the file holds the mode under test
    assert photo.dtype == np.uint8 and photo.flags.writeable
    np.testing.assert_array_equal(photo, expected)


def test_16bit_grey_is_scaled_in_either_byte_order_never_clipped(tmp_path):
    values = np.array([[0, 128, 255, 256, 32767, 65280, 65535]], np.uint16)
    expected = grey_rgb(np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8))
    for image in (Image.fromarray(values), Image.frombytes("I;16B", (7, 1),
                                                           values.astype(">u2").tobytes())):
        np.testing.assert_array_equal(photo_rgb(image, tmp_path / "x.png"), expected)


@pytest.mark.parametrize("image,expected", [
    (Image.fromarray(np.full((2, 2), 0.5, np.float32)), r"32-bit float image"),
    (Image.fromarray(np.full((2, 2), 70_000, np.int32)),
     r"32-bit integer image with values from 70000 to 70000, outside the 16-bit range"),
])
def test_float_and_wider_than_16bit_photos_are_refused_with_their_path(tmp_path, image, expected):
    image.save(tmp_path / "odd.tiff")
    with pytest.raises(DataError, match=rf"odd\.tiff: {expected}"):
        read_photo(tmp_path / "odd.tiff")


@pytest.mark.parametrize("content,expected", [
    (png_header(10_000, 9_000), r"not decoded: 90,000,000 pixels, over PIL's limit of "
                                r"89,478,485 \(PIL\.Image\.MAX_IMAGE_PIXELS"),
    (png_header(30_000, 30_000), r"not decoded: 900,000,000 pixels, over PIL's limit"),
    (png_header(4, 4), r"unreadable \(image file is truncated"),
    (b"not an image", r"unreadable \(cannot identify image file"),
])
def test_files_that_cannot_or_should_not_be_decoded_are_refused_with_their_path(
        tmp_path, content, expected):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(DataError, match=rf"bad\.png: {expected}"):
        read_photo(tmp_path / "bad.png")


def test_a_photo_over_the_pixel_limit_in_a_dataset_is_named(tmp_path):
    write_dataset(tmp_path, num_train=1, num_val=1, size=SIZE, seed=1, layout="folders", mask="ids")
    index = index_dataset(tmp_path)
    sample = index.samples["train"][0]
    sample.image.write_bytes(png_header(10_000, 9_000))
    with pytest.raises(DataError, match=rf"{sample.image}: not decoded: 90,000,000 pixels"):
        read_sample(sample, layout=index.layout, encoding=index.encoding)


def test_16bit_grey_photos_and_16bit_label_files_read_as_their_8bit_versions(tmp_path):
    eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
    for root in (eight, sixteen):
        write_dataset(root, num_train=2, num_val=1, size=SIZE, seed=1, layout="folders",
                      mask="ids")
    for photo in sorted(eight.rglob("img/*.png")):  # the same grey photo, 8 and 16 bits
        grey = np.asarray(Image.open(photo).convert("L"))
        Image.fromarray(grey).save(photo)
        Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen / photo.relative_to(eight))
    for mask in sorted(sixteen.rglob("label/*.png")):  # ids as 16-bit values: never scaled
        Image.fromarray(np.asarray(Image.open(mask)).astype(np.uint16)).save(mask)
    assert Image.open(next(sixteen.rglob("label/*.png"))).mode == "I;16"
    indexes = [index_dataset(root) for root in (eight, sixteen)]
    assert indexes[0].encoding == indexes[1].encoding
    for a, b in zip(indexes[0].samples["train"], indexes[1].samples["train"], strict=True):
        read_a = read_sample(a, layout="folders", encoding=indexes[0].encoding)
        read_b = read_sample(b, layout="folders", encoding=indexes[1].encoding)
        for x, y in zip(read_a, read_b, strict=True):
            np.testing.assert_array_equal(x, y)
        assert 0 < read_b[0].mean() < 255  # not the all-white input it used to be
    resized = [read_resized(s, layout="folders", encoding=index.encoding, size=(48, 96))
               for s, index in zip((a, b), indexes, strict=True)]
    for x, y in zip(*resized, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_16bit_label_file_with_values_past_255_is_refused_not_clipped(tmp_path):
    write_dataset(tmp_path, num_train=1, num_val=1, size=SIZE, seed=1, layout="folders", mask="ids")
    index = index_dataset(tmp_path)
    sample = index.samples["train"][0]
    ids = np.asarray(Image.open(sample.mask)).astype(np.uint16)
    ids[0, :3] = 300
    Image.fromarray(ids).save(sample.mask)
    with pytest.raises(DataError, match=rf"{sample.mask}: mask values outside the label table "
                                        rf"\(ids\): \[300\]"):
        read_sample(sample, layout="folders", encoding=index.encoding)
