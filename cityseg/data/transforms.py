"""Augmentations, applied jointly to image and mask with torchvision.transforms.v2.

Images are `tv_tensors.Image` (uint8, C x H x W) and masks `tv_tensors.Mask` (uint8, H x W),
so geometric transforms move both the same way, masks are resampled with nearest neighbour,
photometric transforms leave masks alone, and pixels a transform invents in the mask (the
corners of a rotation) get the ignore index rather than a made-up class.

Each augmentation's params model also says how it runs batched (`batched(ctx)`, as a
dataset's params say where its samples are), so the registry entry carries both forms: the
batched one is the kornia module that does the same on a batch on the training device, each
sample with its own parameters (data.augment_on: device).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from pydantic import Field, model_validator
from torchvision import tv_tensors
from torchvision.transforms import v2

from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.device_augment import DeviceAugmenter, RandomScaleCrop
from cityseg.registry import AUGMENTATIONS, BuildContext, Params


class AugmentParams(Params):
    """Base of every augmentation's params: its batched (kornia) form, where it has one."""

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        """The kornia module doing this augmentation on a batch, for data.augment_on: device."""
        raise NotImplementedError(f"{type(self).__name__} has no batched form")


def has_batched_form(params: type[Params]) -> bool:
    """Whether an augmentation's params model says how it runs batched on the device."""
    return issubclass(params, AugmentParams) and params.batched is not AugmentParams.batched


class HFlipParams(AugmentParams):
    """Mirror left-right."""

    p: float = Field(0.5, ge=0.0, le=1.0, description="probability of flipping a sample")

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        return K.RandomHorizontalFlip(p=self.p)


@AUGMENTATIONS.register("hflip", params=HFlipParams)
def hflip(p: HFlipParams, ctx: BuildContext) -> v2.Transform:
    """Random horizontal flip of image and mask."""
    return v2.RandomHorizontalFlip(p=p.p)


class RotateParams(AugmentParams):
    """Rotate by a random angle; uncovered mask pixels become ignore."""

    degrees: float = Field(10.0, ge=0.0, le=180.0, description="maximum absolute angle in degrees")
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability of rotating a sample")

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        return K.RandomRotation(self.degrees, resample="bilinear", p=self.p)


@AUGMENTATIONS.register("rotate", params=RotateParams)
def rotate(p: RotateParams, ctx: BuildContext) -> v2.Transform:
    """Random rotation in [-degrees, degrees]; bilinear for images, nearest for masks."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    rotation = v2.RandomRotation(p.degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=fill)
    return v2.RandomApply([rotation], p=p.p)


class ColorJitterParams(AugmentParams):
    """Random brightness, contrast, saturation and hue (image only)."""

    brightness: float = Field(0.2, ge=0.0, description="factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.2, ge=0.0, description="factor drawn from [1-c, 1+c]")
    saturation: float = Field(0.2, ge=0.0, description="factor drawn from [1-s, 1+s]")
    hue: float = Field(0.0, ge=0.0, le=0.5, description="shift drawn from [-h, h]")
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability of jittering a sample")

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        return K.ColorJitter(brightness=self.brightness, contrast=self.contrast,
                             saturation=self.saturation, hue=self.hue, p=self.p)


@AUGMENTATIONS.register("color_jitter", params=ColorJitterParams)
def color_jitter(p: ColorJitterParams, ctx: BuildContext) -> v2.Transform:
    """Photometric jitter; masks pass through unchanged."""
    jitter = v2.ColorJitter(brightness=p.brightness, contrast=p.contrast,
                            saturation=p.saturation, hue=p.hue)
    return v2.RandomApply([jitter], p=p.p)


class RandomResizedCropParams(AugmentParams):
    """Crop a random area and aspect ratio, resized back to data.image_size."""

    scale: tuple[float, float] = Field((0.5, 1.0), description="range of the crop's area fraction")
    ratio: tuple[float, float] = Field((1.5, 2.5), description="range of the crop's width/height")
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability of cropping a sample")

    @model_validator(mode="after")
    def _ordered_ranges(self) -> RandomResizedCropParams:
        for field in ("scale", "ratio"):
            lo, hi = getattr(self, field)
            if not 0 < lo <= hi:
                raise ValueError(f"{field} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.scale[1] > 1:
            raise ValueError(f"scale must be within (0, 1], got {self.scale}")
        return self

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        return K.RandomResizedCrop(ctx.image_size, scale=self.scale, ratio=self.ratio, p=self.p,
                                   cropping_mode="resample")


@AUGMENTATIONS.register("random_resized_crop", params=RandomResizedCropParams)
def random_resized_crop(p: RandomResizedCropParams, ctx: BuildContext) -> v2.Transform:
    """Random crop of image and mask, resized to the experiment's image size."""
    crop = v2.RandomResizedCrop(ctx.image_size, scale=p.scale, ratio=p.ratio, antialias=True)
    return v2.RandomApply([crop], p=p.p)


class RandomScaleParams(AugmentParams):
    """Rescale the frame by a random ratio (mmsegmentation's Cityscapes recipe: 0.5 to 2)."""

    ratio: tuple[float, float] = Field((0.5, 2.0), description="range of the scale factor "
                                                                "applied to the frame's sides")
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability of rescaling a sample")

    @model_validator(mode="after")
    def _ordered(self) -> RandomScaleParams:
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {(lo, hi)}")
        return self

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        """Scaled frames differ in size and cannot share a batch: on the device, random_scale is
        one warp with the random_crop that must follow it (see device_augmentations)."""
        return RandomScaleCrop(ctx.image_size, ratio=self.ratio, p=self.p)


@AUGMENTATIONS.register("random_scale", params=RandomScaleParams)
def random_scale(p: RandomScaleParams, ctx: BuildContext) -> v2.Transform:
    """Both sides times r ~ U(ratio): bilinear (antialiased) for images, nearest for masks."""
    frame = ctx.frame_size or ctx.image_size
    jitter = v2.ScaleJitter(target_size=frame, scale_range=p.ratio, antialias=True)
    return v2.RandomApply([jitter], p=p.p)


class RandomCropParams(AugmentParams):
    """Cut a data.image_size window at a random place (always: batches need that size); a
    smaller frame is padded first, the mask's padding being ignore."""

    def batched(self, ctx: BuildContext) -> torch.nn.Module:
        return RandomScaleCrop(ctx.image_size)


@AUGMENTATIONS.register("random_crop", params=RandomCropParams)
def random_crop(p: RandomCropParams, ctx: BuildContext) -> v2.Transform:
    """A random image_size crop of image and mask, padded where the frame is smaller."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    return v2.RandomCrop(ctx.image_size, pad_if_needed=True, fill=fill)


def build_augmentations(params: list[Params], ctx: BuildContext) -> v2.Transform | None:
    """The experiment's augment list as one joint transform, or None when it is empty."""
    if not params:
        return None
    return v2.Compose([AUGMENTATIONS.build(p, ctx) for p in params])


def device_problem(params: list[AugmentParams]) -> str | None:
    """Why the augment list cannot run batched on the device, or None when it can."""
    for i, p in enumerate(params):
        if not has_batched_form(type(p)):
            return (f"augment[{i}] {p.name} has no batched (kornia) form; "
                    f"use data.augment_on: workers")
        if p.name == "random_scale" and (i + 1 == len(params)
                                         or params[i + 1].name != "random_crop"):
            return (f"augment[{i}] random_scale must be followed directly by random_crop to run "
                    f"on the device (scaled frames differ in size and cannot share a batch until "
                    f"they are cut); reorder augment or use data.augment_on: workers")
    return None


def device_augmentations(params: list[AugmentParams], ctx: BuildContext
                         ) -> DeviceAugmenter | None:
    """The augment list as one batched kornia pipeline (random_scale + random_crop fused into
    one warp), or None when it is empty. The list must pass `device_problem`."""
    if not params:
        return None
    if (problem := device_problem(params)) is not None:
        raise ValueError(problem)
    modules = [p.batched(ctx) for i, p in enumerate(params)
               if not (p.name == "random_crop" and i and params[i - 1].name == "random_scale")]
    return DeviceAugmenter(*modules)
