import pytest
import torch
from torchvision import tv_tensors

from cityseg.config import Experiment  # noqa: F401  (registers every augmentation)
from cityseg.data.transforms import build_augmentations
from cityseg.registry import AUGMENTATIONS, BuildContext
from tests.conftest import positional_pair

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


@pytest.mark.parametrize("seed", range(6))
def test_random_scale_and_crop_keep_image_and_mask_aligned(seed):
    ctx = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=(48, 96),
                       frame_size=(96, 192))
    params = [AUGMENTATIONS.get("random_scale").params(name="random_scale", ratio=(0.3, 2.0)),
              AUGMENTATIONS.get("random_crop").params(name="random_crop")]
    transform = build_augmentations(params, ctx)
    torch.manual_seed(seed)
    image, mask = transform(*positional_pair())
    assert image.shape == (3, 48, 96) and mask.shape == (48, 96)
    labelled = mask != 255
    # away from block edges (bilinear blends two blocks there, and nearest and bilinear may
    # place an edge a pixel apart) the image says the mask's label
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")
    same = torch.nn.functional.max_pool2d(padded, 3, stride=1) == -torch.nn.functional.max_pool2d(
        -padded, 3, stride=1)
    interior = labelled & same[0, 0]
    assert interior.sum() >= 100
    from_image = (image[0].float() / 12).round().long()
    assert (from_image[interior] == mask[interior].long()).float().mean() > 0.99
    # padding (a frame scaled below the crop size): ignore in the mask, black in the image
    assert (image[:, ~labelled] == 0).all()


def test_random_crop_pads_a_small_frame_with_ignore():
    ctx = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=(48, 96))
    crop = AUGMENTATIONS.build(AUGMENTATIONS.get("random_crop").params(name="random_crop"), ctx)
    image, mask = crop(*positional_pair(32, 64))
    assert mask.shape == (48, 96) and (mask == 255).sum() == 48 * 96 - 32 * 64
    kept = mask != 255
    assert torch.equal((image[0][kept].float() / 12).round().long(), mask[kept].long())


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_augmentation_has_its_batched_form_on_its_registry_entry(name):
    from cityseg.data.transforms import has_batched_form

    entry = AUGMENTATIONS.get(name)
    assert has_batched_form(entry.params)
    module = entry.params(name=name).batched(CTX)
    assert isinstance(module, torch.nn.Module)
