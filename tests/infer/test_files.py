"""`cityseg predict` on files: masks, overlays and probabilities of each input's size; inputs it
cannot or should not decode are named and skipped; an --out that is a file is refused."""

import numpy as np
from PIL import Image

from cityseg.cli import main
from cityseg.data.synthetic import render_scene
from cityseg.infer import files, loading
from tests.conftest import png_header


def test_predict_writes_masks_and_overlays_of_each_inputs_size_and_skips_corrupt_files(
        trained_run, tmp_path, capsys):
    source_dir, result = trained_run
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 120, 3), dtype=np.uint8)).save(
        images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    single = tmp_path / "c.jpeg"
    Image.fromarray(rng.integers(0, 256, (97, 41, 3), dtype=np.uint8)).save(single)
    out = tmp_path / "out"
    code = main(["predict", "--run", result.run_id, "--runs", str(source_dir / "runs"),
                 str(images), str(single), "--out", str(out), "--probabilities"])
    assert code == 2  # one input was skipped
    assert "broken.png: unreadable" in capsys.readouterr().err
    for stem, (h, w) in {"a": (50, 70), "b": (33, 120), "c": (97, 41)}.items():
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(out / f"{stem}_overlay.png").size == (w, h)
        assert Image.open(out / f"{stem}_prob.png").size == (w, h)


def test_predict_skips_images_it_should_not_decode_names_them_and_writes_the_rest(
        trained_run, tmp_path, capsys):
    source_dir, result = trained_run
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "b_bomb.png").write_bytes(png_header(10_000, 9_000))
    (images / "c_truncated.png").write_bytes((images / "a.png").read_bytes()[:80])
    Image.fromarray(rng.integers(0, 256, (25, 35, 3), dtype=np.uint8)).save(images / "d.png")
    out = tmp_path / "out"
    code = main(["predict", "--run", result.run_id, "--runs", str(source_dir / "runs"),
                 str(images), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"skipped: {images / 'b_bomb.png'}: not decoded: 90,000,000 pixels, over PIL's "
            f"limit") in err
    assert f"skipped: {images / 'c_truncated.png'}: unreadable (image file is truncated" in err
    assert "2 input(s) skipped" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png",
                                                      "d_mask.png", "d_overlay.png"]


def test_predict_refuses_an_out_that_is_a_file_before_loading_a_model(tmp_path, capsys):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"x")
    for out, what in ((taken, "is a file"), (taken / "sub", f"is inside {taken}, a file")):
        # no such run or store either: --out is checked first
        assert main(["predict", "--run", "nope", "--runs", str(tmp_path / "nowhere"),
                     str(taken), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: --out {out}: {what}; give a folder (created if missing)" in err
    assert taken.read_bytes() == b"x"


def test_a_16bit_greyscale_png_gives_the_same_mask_as_its_8bit_version(trained_run, tmp_path):
    source_dir, result = trained_run
    photo, _ = render_scene(np.random.default_rng(5), 48, 96)
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    (tmp_path / "eight").mkdir()
    (tmp_path / "sixteen").mkdir()
    Image.fromarray(grey).save(tmp_path / "eight" / "scene.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen" / "scene.png")
    assert Image.open(tmp_path / "sixteen" / "scene.png").mode == "I;16"
    trained = loading.load_trained(run_id=result.run_id, checkpoint=None,
                                     runs=source_dir / "runs")
    masks = []
    for bits in ("eight", "sixteen"):
        written, skipped = files.predict_files(trained, [tmp_path / bits],
                                                   tmp_path / f"out_{bits}", probabilities=True)
        assert len(written) == 1 and not skipped
        masks.append(np.asarray(Image.open(written[0])))
        for kind in ("overlay", "prob"):
            assert (Image.open(tmp_path / f"out_{bits}" / f"scene_{kind}.png").tobytes()
                    == Image.open(tmp_path / "out_eight" / f"scene_{kind}.png").tobytes())
    np.testing.assert_array_equal(masks[0], masks[1])
    # the barely trained model may find no foreground: its probabilities show what it saw
    _, white = trained.predictor.predict_photo(np.full((48, 96, 3), 255, np.uint8))
    seen = np.asarray(Image.open(tmp_path / "out_sixteen" / "scene_prob.png"))
    assert not np.array_equal(seen, (white * 255).round().astype(np.uint8))  # not all-white
