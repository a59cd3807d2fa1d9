"""U-Net (Ronneberger et al., 2015) with the parts of milesial/Pytorch-UNet.

depth=4, base_channels=64, batch norm, transposed convolutions, 3 in and 2 out is the classic
31,037,698-parameter network.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from cityseg.errors import ConfigError
from cityseg.models.encoders import ENCODERS, TorchvisionEncoder, stages_for
from cityseg.registry import MODELS, BuildContext, Params


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class DoubleConv(nn.Module):
    """(conv 3x3 -> norm -> ReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int, *, norm: str, dropout: float = 0.0) -> None:
        super().__init__()
        bias = norm == "none"  # a norm layer's shift makes the conv bias redundant
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias), _norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias), _norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """Max-pool by 2, then DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, *, norm: str, dropout: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch, norm=norm, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Upsample by 2, concatenate the skip connection, then DoubleConv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, *, norm: str, upsample: str) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
            up_ch = in_ch // 2
        else:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            up_ch = in_ch
        self.conv = DoubleConv(up_ch + skip_ch, out_ch, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)  # (B, C', 2h, 2w)
        return self.conv(x if skip is None else torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Encoder of `depth` Down stages, decoder of `depth` Up stages with skip connections."""

    def __init__(self, *, in_channels: int, out_channels: int, depth: int, base_channels: int,
                 norm: str, upsample: str, dropout: float) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]  # e.g. 64, 128, 256, 512, 1024
        self.depth = depth
        self.inc = DoubleConv(in_channels, widths[0], norm=norm)
        # dropout only in the two deepest stages, where it regularises without starving the skips
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1], norm=norm, dropout=dropout if i >= depth - 2 else 0.0)
            for i in range(depth)
        )
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i], norm=norm, upsample=upsample)
            for i in reversed(range(depth))
        )
        self.outc = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = 2**self.depth
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by "
                             f"2**depth = {stride}")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)  # (B, out_channels, H, W) logits


class EncoderUNet(nn.Module):
    """A U-Net on a torchvision backbone: the decoder takes the encoder's feature maps as
    skips, shallow to deep, and up-samples from the deepest to full resolution (stages below
    the encoder's first stride have no skip). Decoder width at stride s: base_channels * s / 2
    (base 32: 256, 128, 64, 32, 16, segmentation_models_pytorch's default)."""

    def __init__(self, *, encoder: nn.Module, out_channels: int, base_channels: int, norm: str,
                 upsample: str) -> None:
        super().__init__()
        self.encoder = encoder
        strides, channels = encoder.strides, encoder.channels
        self.depth = strides[-1].bit_length() - 1

        def width(stride: int) -> int:
            return max(1, base_channels * stride // 2)

        ups, x_ch = [], channels[-1]
        for i in reversed(range(len(strides) - 1)):
            ups.append(Up(x_ch, channels[i], width(strides[i]), norm=norm, upsample=upsample))
            x_ch = width(strides[i])
        stride = strides[0]
        while stride > 1:  # to full resolution: no skip connection there
            stride //= 2
            ups.append(Up(x_ch, 0, width(stride), norm=norm, upsample=upsample))
            x_ch = width(stride)
        self.ups = nn.ModuleList(ups)
        self.skips = len(strides) - 1
        self.outc = nn.Conv2d(x_ch, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = 2**self.depth
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by "
                             f"2**depth = {stride}")
        features = self.encoder(x)
        x = features.pop()
        for i, up in enumerate(self.ups):
            x = up(x, features.pop() if i < self.skips else None)
        return self.outc(x)


class UNetParams(Params):
    """U-Net options."""

    depth: int = Field(
        4, ge=1, le=7, description="number of down-sampling stages; image sides must divide by "
                                   "2**depth")
    base_channels: int = Field(
        32, ge=1, description="channels of the first stage, doubled at each down stage")
    norm: Literal["batch", "group", "none"] = Field(
        "batch", description="normalisation after each convolution")
    upsample: Literal["transpose", "bilinear"] = Field(
        "transpose", description="decoder upsampling: learned (transposed conv) or bilinear")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="channel dropout in the two deepest encoder stages")
    in_channels: int = Field(3, ge=1, description="input image channels")
    encoder: Literal[("plain", *ENCODERS)] = Field(  # type: ignore[valid-type]
        "plain", description="plain: the original U-Net encoder; or a torchvision backbone: "
                             + "; ".join(f"{k}: {v.description}" for k, v in ENCODERS.items()))
    weights: str = Field(
        "none", description="encoder weights: none, imagenet (torchvision's, downloaded to "
                            "the torch hub cache), or the path of a state dict saved from the "
                            "torchvision model")
    freeze_encoder_epochs: int = Field(
        0, ge=0, description="train only the decoder for this many epochs (the encoder's "
                             "weights fixed, its batch norm in eval mode)")

    @model_validator(mode="after")
    def _fits_encoder(self) -> UNetParams:
        if self.encoder == "plain":
            for key, default in (("weights", "none"), ("freeze_encoder_epochs", 0)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key} needs a pretrained-style encoder (model.encoder: "
                                     f"{', '.join(ENCODERS)}); plain has none")
            return self
        if self.in_channels != 3:
            raise ValueError(f"in_channels: {self.encoder} takes 3-channel (RGB) images")
        if self.dropout:
            raise ValueError("dropout applies to the plain encoder only")
        try:
            stages_for(self.encoder, self.depth)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix("model.")) from None
        return self

    @property
    def input_divisor(self) -> int:
        """Image height and width must be multiples of this."""
        return 2**self.depth


@MODELS.register("unet", params=UNetParams)
def unet(p: UNetParams, ctx: BuildContext) -> UNet:
    """U-Net with configurable depth, width, normalisation, upsampling and encoder."""
    if p.encoder != "plain":
        encoder = TorchvisionEncoder(p.encoder, p.depth, p.weights)
        return EncoderUNet(encoder=encoder, out_channels=ctx.out_channels,
                           base_channels=p.base_channels, norm=p.norm, upsample=p.upsample)
    return UNet(in_channels=p.in_channels, out_channels=ctx.out_channels, depth=p.depth,
                base_channels=p.base_channels, norm=p.norm, upsample=p.upsample, dropout=p.dropout)
