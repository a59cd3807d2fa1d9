import pytest
import torch

from cityseg.config import Experiment  # noqa: F401  (registers every model)
from cityseg.models.unet import UNet
from cityseg.registry import MODELS, BuildContext


def unet(**kw):
    args = dict(in_channels=3, out_channels=1, depth=3, base_channels=4, norm="batch",
                upsample="transpose", dropout=0.0)
    return UNet(**{**args, **kw})


def test_classic_unet_has_the_published_parameter_count():
    # milesial/Pytorch-UNet with bilinear=False, 3 in, 2 classes: 31,037,698 parameters
    model = unet(depth=4, base_channels=64, out_channels=2)
    assert sum(p.numel() for p in model.parameters()) == 31_037_698


@pytest.mark.parametrize("depth,size", [(1, (8, 6)), (2, (16, 32)), (3, (24, 40)), (4, (32, 64))])
def test_output_shape_matches_input_for_several_depths(depth, size):
    out = unet(depth=depth)(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_options_train(norm, upsample):
    model = unet(norm=norm, upsample=upsample, dropout=0.2, out_channels=3)
    out = model(torch.randn(2, 3, 16, 16))
    out.mean().backward()
    assert out.shape == (2, 3, 16, 16)
    assert all(p.grad is not None for p in model.parameters())


def test_size_not_divisible_by_two_to_the_depth_is_rejected():
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*depth = 8"):
        unet(depth=3)(torch.randn(1, 3, 20, 16))


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_builds_with_defaults_and_trains(name):
    model = MODELS.build(MODELS.get(name).params(name=name),
                         BuildContext("binary", 1, 255, (32, 32)))
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 1, 32, 32)
