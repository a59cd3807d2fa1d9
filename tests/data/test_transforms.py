import pytest
import torch
from torchvision import tv_tensors

from cityseg.config import Experiment  # noqa: F401  (registers every augmentation)
from cityseg.data.transforms import build_augmentations
from cityseg.registry import AUGMENTATIONS, BuildContext

CTX = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=(32, 64))


def aug(name, **kw):
    return AUGMENTATIONS.build(AUGMENTATIONS.get(name).params(name=name, **kw), CTX)


def pair():
    """Image whose channels all equal 255 * mask, so geometry can be checked on both."""
    torch.manual_seed(0)
    mask = torch.zeros(32, 64, dtype=torch.uint8)
    mask[8:24, 4:30] = 1
    return tv_tensors.Image((mask * 255).expand(3, -1, -1).clone()), tv_tensors.Mask(mask)


def test_hflip_moves_image_and_mask_together():
    image, mask = pair()
    out_image, out_mask = aug("hflip", p=1.0)(image, mask)
    assert torch.equal(out_mask, mask.flip(-1))
    assert torch.equal(out_image, image.flip(-1))


def test_rotation_fills_uncovered_mask_pixels_with_ignore():
    image, mask = pair()
    out_image, out_mask = aug("rotate", degrees=45)(image, mask)
    assert set(out_mask.unique().tolist()) <= {0, 1, 255}
    assert (out_mask == 255).any()  # the corners
    agree = (out_image[0] > 127) == (out_mask == 1)
    assert agree[out_mask != 255].float().mean() > 0.97


def test_color_jitter_changes_image_only():
    image, mask = pair()
    image = tv_tensors.Image(torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8))
    out_image, out_mask = aug("color_jitter", brightness=0.5, contrast=0.5,
                              saturation=0.5)(image, mask)
    assert torch.equal(out_mask, mask)
    assert not torch.equal(out_image, image)


def test_random_resized_crop_keeps_size_and_alignment():
    image, mask = pair()
    for _ in range(5):
        out_image, out_mask = aug("random_resized_crop", scale=(0.3, 1.0))(image, mask)
        assert out_image.shape == (3, 32, 64) and out_mask.shape == (32, 64)
        assert set(out_mask.unique().tolist()) <= {0, 1}  # nearest: no invented classes
        assert ((out_image[0] > 127) == (out_mask == 1)).float().mean() > 0.95


def test_bad_crop_range_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        AUGMENTATIONS.get("random_resized_crop").params(name="random_resized_crop",
                                                        scale=(0.9, 0.5))


def test_empty_augment_list_means_no_transform():
    assert build_augmentations([], CTX) is None
