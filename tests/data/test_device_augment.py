"""Augmentations on the training device: per-sample parameters from (seed, epoch, sample),
image and mask aligned, the same as in DataLoader workers."""

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cityseg.config import load_experiment
from cityseg.data.datasets import DeviceAugmenter, SegmentationDataset
from cityseg.data.transforms import build_augmentations
from cityseg.engine.runner import run
from cityseg.registry import AUGMENTATIONS, BuildContext
from cityseg.tracking import tracking_uri
from tests.conftest import QUICKSTART, tiny_overrides
from tests.data.test_transforms import positional_pair

CTX = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=(48, 96),
                   frame_size=(96, 192))
PIPELINE = [("random_scale", {"ratio": (0.5, 1.5)}), ("random_crop", {}),
            ("rotate", {"degrees": 20}), ("hflip", {}),
            ("color_jitter", {"brightness": 0.3})]


def pipeline():
    return build_augmentations([AUGMENTATIONS.get(n).params(name=n, **kw) for n, kw in PIPELINE],
                               CTX)


class Frames:
    """A reader of identical position-coded frames (its train ids are its labels)."""

    def __init__(self, count):
        image, mask = positional_pair()
        self.photo = image.permute(1, 2, 0).numpy()
        self.ids = mask.numpy()
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return self.photo, self.ids


def dataset(count=6):
    return SegmentationDataset(Frames(count), lut=np.arange(256, dtype=np.uint8),
                               transform=pipeline(), seed=7)


def device_batch(data, epoch):
    data.deferred = True
    items = [data[(epoch, i)] for i in range(len(data))]
    data.deferred = False
    return tuple(torch.stack(column) for column in zip(*items, strict=True))


def test_device_mode_equals_worker_mode_sample_for_sample():
    data = dataset()
    images, masks, seeds = device_batch(data, epoch=3)
    out_images, out_masks = DeviceAugmenter(data.transform)(images, masks, seeds)
    for i in range(len(data)):
        image, mask = data[(3, i)]  # what a DataLoader worker delivers
        assert torch.equal(out_images[i], image) and torch.equal(out_masks[i], mask)


def test_device_mode_draws_per_sample_parameters_and_repeats_them_for_a_seed():
    data = dataset()
    images, masks, seeds = device_batch(data, epoch=1)
    augment = DeviceAugmenter(data.transform)
    first_images, first_masks = augment(images, masks, seeds)
    # identical frames, different seeds: the samples differ from each other
    assert len({m.numpy().tobytes() for m in first_masks}) == len(data)
    again_images, again_masks = augment(images, masks, seeds)
    assert torch.equal(first_images, again_images) and torch.equal(first_masks, again_masks)
    next_epoch = augment(*device_batch(data, epoch=2))
    assert not torch.equal(next_epoch[1], first_masks)


@pytest.mark.parametrize("epoch", [1, 2])
def test_device_mode_keeps_image_and_mask_aligned(epoch):
    geometric = [AUGMENTATIONS.get(n).params(name=n, **kw) for n, kw in PIPELINE[:4]]
    data = dataset()
    data.transform = build_augmentations(geometric, CTX)  # red stays 12 x the block's label
    images, masks = DeviceAugmenter(data.transform)(*device_batch(data, epoch))
    pool, checked = torch.nn.functional.max_pool2d, 0
    for image, mask in zip(images, masks, strict=True):
        # 2 pixels from any edge of a block: antialiased down-scaling blurs that far
        pad = torch.nn.functional.pad(mask[None, None].float(), (2, 2, 2, 2), mode="replicate")
        interior = (mask != 255) & (pool(pad, 5, stride=1) == -pool(-pad, 5, stride=1))[0, 0]
        checked += int(interior.sum())
        from_image = (image[0].float() / 12).round().long()
        if interior.any():  # a frame scaled far down may have no block interior left
            assert (from_image[interior] == mask[interior].long()).float().mean() > 0.98
    assert checked >= 1000


def test_a_run_with_device_augmentation_matches_worker_mode_on_the_cpu(tmp_path):
    def dice(mode):
        exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path / mode), "data.num_workers=0",
                                           "tracking.log_model=false", f"data.augment_on={mode}",
                                           "trainer.deterministic=true"])
        result = run(exp)
        client = MlflowClient(tracking_uri=tracking_uri(exp.tracking.dir))
        assert client.get_run(result.run_id).data.tags["augment_on"] == mode
        return [m.value for m in client.get_metric_history(result.run_id, "val/dice")]

    workers, device = dice("workers"), dice("device")
    assert workers == pytest.approx(device, abs=1e-6)
