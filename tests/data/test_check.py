import json

import numpy as np
import pytest
from PIL import Image

from cityseg.cli import main
from cityseg.data.check import check_dataset
from cityseg.data.cityscapes import DEFAULT_FOREGROUND, LABEL_BY_NAME, id_to_train_id_lut
from cityseg.data.synthetic import write_dataset
from tests.conftest import CITYSCAPES_MINI


def broken_dataset(root):
    """An official-layout dataset with one broken sample of every kind."""
    write_dataset(root, num_train=6, num_val=1, size=(32, 64), seed=2)
    masks = sorted((root / "gtFine" / "train" / "synthtown").iterdir())
    images = sorted((root / "leftImg8bit" / "train" / "synthtown").iterdir())
    truncated = images[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    masks[1].unlink()  # image without mask
    Image.new("L", (10, 10)).save(masks[2])  # size mismatch
    Image.fromarray(np.full((32, 64), 40, dtype=np.uint8)).save(masks[3])  # value outside the table
    orphan = masks[4].with_name("synthtown_999999_000019_gtFine_labelIds.png")
    Image.new("L", (64, 32)).save(orphan)  # mask without image
    return {str(truncated): "unreadable", str(images[1]): "image without mask",
            str(masks[2]): "differs from image size", str(masks[3]): "outside the label table",
            str(orphan): "mask without image"}


def test_every_broken_sample_is_reported_with_its_path(tmp_path):
    expected = broken_dataset(tmp_path)
    report = check_dataset(tmp_path, workers=1)
    found = {item["path"]: item["reason"] for item in report["broken"]}
    assert set(found) == set(expected)
    for path, words in expected.items():
        assert words in found[path], (path, found[path])


def test_colours_outside_the_table_are_broken(tmp_path):
    write_dataset(tmp_path, num_train=3, num_val=1, size=(32, 64), seed=2, layout="folders",
                  mask="color")
    bad = sorted((tmp_path / "train" / "label").iterdir())[2]
    rng = np.random.default_rng(0)
    # a photo, not a mask
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(bad)
    report = check_dataset(tmp_path, workers=1)
    assert [item["path"] for item in report["broken"]] == [str(bad)]
    assert "colours outside the label table" in report["broken"][0]["reason"]


def test_cli_check_exits_2_on_broken_and_json_is_parseable(tmp_path, capsys):
    expected = broken_dataset(tmp_path)
    assert main(["data", "check", str(tmp_path), "--json", "--workers", "1"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert {item["path"] for item in report["broken"]} == set(expected)


def test_cli_synth_then_check_is_clean(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["data", "synth", str(out), "--layout", "pairs", "--num-train", "3",
                 "--num-val", "1", "--size", "32", "64", "--bgr"]) == 0
    assert main(["data", "check", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert ("layout: pairs (detected)" in text and "channel order bgr" in text
            and "broken samples: none" in text)


@pytest.mark.skipif(not CITYSCAPES_MINI.is_dir(), reason="../shared/data/cityscapes-mini is absent")
def test_real_frames_counts_and_foreground_fraction_match_a_direct_count():
    report = check_dataset(CITYSCAPES_MINI)
    assert report["layout"] == "official" and report["mask_encoding"]["kind"] == "ids"
    assert report["splits"]["train"]["images"] == 6 and report["splits"]["val"]["images"] == 2
    assert report["splits"]["train"]["image_sizes"] == {"2048x1024": 6}
    assert report["broken"] == []
    fg_ids = [LABEL_BY_NAME[name].id for name in DEFAULT_FOREGROUND]
    fg = labelled = 0
    for mask in sorted((CITYSCAPES_MINI / "gtFine" / "train").glob("*/*_labelIds.png")):
        ids = np.asarray(Image.open(mask))
        fg += np.isin(ids, fg_ids).sum()
        labelled += (id_to_train_id_lut()[ids] != 255).sum()
    assert report["foreground_fraction"] == pytest.approx(fg / labelled, rel=1e-12)
    assert report["suggested_pos_weight"] == pytest.approx((labelled - fg) / fg, abs=0.01)
