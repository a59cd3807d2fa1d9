"""Augmentations batched on the training device (kornia): per-sample parameters from (seed,
epoch, sample), image and mask aligned, and a run that trains as well as worker mode."""

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import default_collate

from cityseg.config import load_experiment
from cityseg.data.datasets import SegmentationDataset
from cityseg.data.device_augment import DeviceAugmenter, RandomScaleCrop
from cityseg.data.transforms import build_augmentations, device_augmentations
from cityseg.errors import ConfigError
from cityseg.registry import AUGMENTATIONS, BuildContext
from cityseg.tracking import tracking_uri
from cityseg.train.runner import run
from tests.conftest import QUICKSTART, positional_pair, tiny_overrides

CTX = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=(48, 96),
                   frame_size=(96, 192))
PIPELINE = [("random_scale", {"ratio": (0.5, 1.5)}), ("random_crop", {}),
            ("rotate", {"degrees": 20}), ("hflip", {}),
            ("color_jitter", {"brightness": 0.3})]


def params(pipeline=PIPELINE):
    return [AUGMENTATIONS.get(n).params(name=n, **kw) for n, kw in pipeline]


class Frames:
    """A reader of identical position-coded frames (its train ids are its labels)."""

    def __init__(self, count, height=96, width=192):
        image, mask = positional_pair(height, width)
        self.photo = image.permute(1, 2, 0).numpy()
        self.ids = mask.numpy()
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return self.photo, self.ids


def dataset(pipeline=PIPELINE, count=6, ctx=CTX):
    data = SegmentationDataset(Frames(count, *ctx.frame_size), lut=np.arange(256, dtype=np.uint8),
                               transform=build_augmentations(params(pipeline), ctx), seed=7)
    data.device_augment = device_augmentations(params(pipeline), ctx)
    return data


def loaded(data, epoch, indices=None):
    """What the DataLoader delivers in device mode: frames, masks and the drawn parameters."""
    return default_collate([data[(epoch, i)] for i in indices or range(len(data))])


def aligned_share(image, mask):
    """Share of block-interior mask pixels whose label the image's red channel (12 x label)
    repeats, and how many there were: 2 pixels from any block edge (interpolation blurs that
    far)."""
    pool = torch.nn.functional.max_pool2d
    pad = torch.nn.functional.pad(mask[None, None].float(), (2, 2, 2, 2), mode="replicate")
    interior = (mask != 255) & (pool(pad, 5, stride=1) == -pool(-pad, 5, stride=1))[0, 0]
    from_image = (image[0] / 12).round().long()
    hits = (from_image[interior] == mask[interior].long()).float()
    return (hits.mean().item() if interior.any() else 1.0), int(interior.sum())


def test_the_loader_delivers_unaugmented_frames_and_parameters_as_a_function_of_the_seed():
    data = dataset()
    image, mask, drawn = data[(2, 4)]
    assert image.shape == (3, 96, 192) and image.dtype == torch.uint8 and mask.shape == (96, 192)
    assert torch.equal(image, torch.from_numpy(data.reader[4][0]).permute(2, 0, 1))
    again = data[(2, 4)][2]
    assert drawn.keys() == again.keys()
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)
    other = data[(3, 4)][2]  # the next epoch draws new parameters
    assert not all(torch.equal(drawn[k], other[k]) for k in drawn)


def test_each_sample_gets_its_own_parameters_and_keeps_them_in_any_batch():
    data = dataset()
    images, masks, drawn = loaded(data, epoch=1)
    out_images, out_masks = data.device_augment(images, masks, drawn)
    assert out_images.shape == (6, 3, 48, 96) and out_masks.shape == (6, 48, 96)
    assert out_masks.dtype == torch.uint8 and out_images.dtype == torch.float32
    # identical frames, different seeds: every sample differs from the others
    assert len({m.numpy().tobytes() for m in out_masks}) == len(data)
    # a sample's result depends on (seed, epoch, sample) only, not on its batch or position
    part_images, part_masks = data.device_augment(*loaded(data, epoch=1, indices=[4, 1]))
    assert torch.equal(part_masks[0], out_masks[4]) and torch.equal(part_masks[1], out_masks[1])
    assert torch.allclose(part_images[0], out_images[4], atol=1e-3)
    assert torch.allclose(part_images[1], out_images[1], atol=1e-3)
    next_epoch = data.device_augment(*loaded(data, epoch=2))
    assert not torch.equal(next_epoch[1], out_masks)


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_geometric_augmentations_keep_image_and_mask_aligned(epoch):
    data = dataset(PIPELINE[:4])  # photometric jitter would change the red channel
    images, masks = data.device_augment(*loaded(data, epoch))
    checked = 0
    for image, mask in zip(images, masks, strict=True):
        share, count = aligned_share(image, mask)
        assert share > 0.98
        checked += count
    assert checked >= 1000
    assert (masks == 255).any()  # rotation corners and padding of down-scaled frames: ignore


def test_a_crop_without_scaling_is_a_window_of_the_frame_at_an_integer_position():
    image, mask = (t.as_subclass(torch.Tensor) for t in positional_pair(96, 192))
    crop = device_augmentations(params([("random_crop", {})]), CTX)
    drawn = default_collate([crop.draw(seed, tuple(image.shape)) for seed in range(8)])
    out_images, out_masks = crop(image.expand(8, -1, -1, -1), mask.expand(8, -1, -1), drawn)
    corners = set()
    for out_image, out_mask in zip(out_images, out_masks, strict=True):
        # the reference: the one window of the frame that equals the mask, found by search
        found = [(y, x) for y in range(96 - 48 + 1) for x in range(192 - 96 + 1)
                 if torch.equal(mask[y:y + 48, x:x + 96], out_mask)
                 and torch.allclose(image[:, y:y + 48, x:x + 96].float(), out_image, atol=0.01)]
        assert found
        corners.add(found[0])
    assert len(corners) > 1


def test_a_frame_scaled_below_the_window_is_padded_with_ignore_in_the_mask():
    image, mask = (t.as_subclass(torch.Tensor) for t in positional_pair(96, 192))
    # 96x192 -> 24x48 inside 48x96
    augment = DeviceAugmenter(RandomScaleCrop((48, 96), ratio=(0.25, 0.25)))
    drawn = default_collate([augment.draw(seed, tuple(image.shape)) for seed in range(4)])
    out_images, out_masks = augment(image.expand(4, -1, -1, -1), mask.expand(4, -1, -1), drawn)
    for out_image, out_mask in zip(out_images, out_masks, strict=True):
        assert int((out_mask != 255).sum()) == 24 * 48
        assert float(out_image[:, out_mask == 255].abs().max()) == 0.0  # image padding is 0


def test_device_mode_refuses_a_list_it_cannot_batch_naming_the_item(tmp_path):
    overrides = [*tiny_overrides(tmp_path), "data.augment_on=device"]
    path = tmp_path / "exp.yaml"
    path.write_text(QUICKSTART.read_text().replace("augment:", "augment:\n"
                    "  - {name: random_scale}\n  - {name: hflip}\n  - {name: random_crop}"))
    with pytest.raises(ConfigError) as error:
        load_experiment(path, overrides)
    message = str(error.value)
    assert "data.augment_on: device" in message and "augment[0] random_scale" in message
    assert "random_crop" in message
    # auto on the CPU (workers) accepts the same list
    load_experiment(path, [*tiny_overrides(tmp_path), "data.augment_on=auto"])


def test_a_run_with_device_augmentation_trains_like_worker_mode(tmp_path):
    def history(mode):
        exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path / mode, epochs=3),
                                           "tracking.log_model=false", f"data.augment_on={mode}",
                                           "trainer.deterministic=true"])
        result = run(exp)
        client = MlflowClient(tracking_uri=tracking_uri(exp.tracking.dir))
        assert client.get_run(result.run_id).data.tags["augment_on"] == mode
        return {key: [m.value for m in client.get_metric_history(result.run_id, key)]
                for key in ("train/loss", "val/loss")}

    workers, device = history("workers"), history("device")
    assert device["train/loss"] != workers["train/loss"]  # kornia draws its own parameters
    assert device["val/loss"][-1] == pytest.approx(workers["val/loss"][-1], rel=0.05)
