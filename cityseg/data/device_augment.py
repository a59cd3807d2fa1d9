"""Augmentations on the training device, batched with kornia.

In device mode (`data.augment_on: device`) the DataLoader workers deliver cached uint8 frames
and, beside each, the random parameters of its augmentations, drawn from the sample's seed
(seed, epoch, index): the workers do the cheap per-sample draws, the device does the pixel
work, every sample with its own parameters in one batched call per augmentation. A sample's
parameters never depend on the other samples of its batch, so resuming stays exact.

kornia moves the image and the mask with the same transform (masks with nearest neighbour);
pixels a geometric transform invents are 0 in both, so the mask travels as label + 1 and a 0
becomes the ignore index.
"""

from __future__ import annotations

import torch
from kornia.augmentation import AugmentationSequential, ColorJitter, RandomResizedCrop
from kornia.augmentation.container.params import ParamItem
from kornia.augmentation.random_generator.base import RandomGeneratorBase

from cityseg.data.cityscapes import IGNORE_INDEX

# parameters drawn once per call by kornia, not per sample: set when a batch is assembled
_PER_BATCH = ("forward_input_shape", "order")


class _ScaleCropGenerator(RandomGeneratorBase):
    """Per sample: scale factor r ~ U(ratio) (1 when not applied), then a `size` window at a
    uniform integer position of the r-scaled frame, or the scaled frame at a uniform position
    inside the window when it is smaller, as torchvision's ScaleJitter + RandomCrop(pad_if_
    needed) do. The window is returned as kornia's src/dst corner boxes on the frame."""

    def __init__(self, size: tuple[int, int], ratio: tuple[float, float], p: float) -> None:
        super().__init__()
        self.size, self.ratio, self.p = size, ratio, p

    def make_samplers(self, device: torch.device, dtype: torch.dtype) -> None:
        pass  # plain torch.rand on the CPU generator

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False
                ) -> dict[str, torch.Tensor]:
        count, (height, width), (h, w) = batch_shape[0], batch_shape[-2:], self.size
        u = torch.rand(1 if same_on_batch else count, 4, dtype=torch.float64).expand(count, 4)
        lo, hi = self.ratio
        r = torch.where(u[:, 0] < self.p, lo + (hi - lo) * u[:, 1], torch.ones_like(u[:, 1]))
        scaled = torch.stack([(height * r).floor(), (width * r).floor()], dim=1).clamp(min=1)
        window = torch.tensor([h, w], dtype=torch.float64)
        spread = scaled - window  # the window's first pixel in the scaled frame ranges over it
        origin = torch.minimum(spread, torch.zeros(2, dtype=torch.float64)) + (
            u[:, 2:] * (spread.abs() + 1)).floor()
        factor = scaled / torch.tensor([height, width], dtype=torch.float64)
        # pixel centres of the window's first and last row/column, in frame coordinates
        first = (origin + 0.5) / factor - 0.5
        last = (origin + window - 0.5) / factor - 0.5
        (y1, x1), (y2, x2) = first.unbind(1), last.unbind(1)
        src = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1),
                           torch.stack([x2, y2], 1), torch.stack([x1, y2], 1)], dim=1)
        dst = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]],
                           dtype=torch.float64).expand(count, 4, 2)
        return {"src": src.float(), "dst": dst.float(),
                "input_size": torch.tensor([[height, width]]).expand(count, 2),
                "output_size": torch.tensor([[h, w]]).expand(count, 2)}


class RandomScaleCrop(RandomResizedCrop):
    """random_scale followed by random_crop as one warp: each sample's frame scaled by its own
    r and cut to `size`, padding where the scaled frame is smaller (kornia's resampling crop,
    with this module's parameters)."""

    def __init__(self, size: tuple[int, int], ratio: tuple[float, float] = (1.0, 1.0),
                 p: float = 1.0) -> None:
        super().__init__(size, cropping_mode="resample", p=1.0)
        self._param_generator = _ScaleCropGenerator(size, ratio, p)


class DeviceAugmenter:
    """The training augmentations as one kornia AugmentationSequential over image and mask.

    `draw(seed, shape)` runs where the sample is loaded (a DataLoader worker) and returns its
    parameters as a flat dict of tensors, which the loader batches like any other field;
    calling the augmenter applies a batch of them on the device the frames are on."""

    def __init__(self, *augmentations: torch.nn.Module) -> None:
        self.sequential = AugmentationSequential(*augmentations, data_keys=["input", "mask"])

    def draw(self, seed: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The parameters of one (C, H, W) sample, from its seed, the caller's RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            items = self.sequential.forward_parameters(torch.Size([1, *shape]))
        return {f"{item.name}/{key}": value[0] for item in items
                for key, value in item.data.items() if key not in _PER_BATCH}

    def _params(self, drawn: dict[str, torch.Tensor], shape: torch.Size) -> list[ParamItem]:
        items = []
        for name, module in self.sequential.named_children():
            data = {key.split("/", 1)[1]: value for key, value in drawn.items()
                    if key.startswith(f"{name}/")}
            data["forward_input_shape"] = torch.tensor(shape)
            if isinstance(module, ColorJitter):  # one fixed order, not one per batch
                data["order"] = torch.arange(4)
            items.append(ParamItem(name, data))
        return items

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 drawn: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 frames and (B, H, W) uint8 masks -> (B, 3, h, w) float images
        in 0..255 and (B, h, w) uint8 masks, uncovered mask pixels ignore."""
        drawn = {key: value.to(images.device, non_blocking=True) for key, value in drawn.items()}
        params = self._params(drawn, images.shape)
        image, shifted = self.sequential(images.float() / 255, masks[:, None].to(torch.int16) + 1,
                                         params=params)
        labels = torch.where(shifted == 0, IGNORE_INDEX, shifted - 1).to(torch.uint8)[:, 0]
        return image * 255, labels
