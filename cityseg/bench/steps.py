"""The bare training step and the device: step speed, model FLOPs, the matmul peak."""

from __future__ import annotations

import time

import torch

from cityseg.bench.baseline import BASELINE_SHAPE, BASELINE_UNET, unet_kwargs
from cityseg.losses import WeightedBCE
from cityseg.models.unet import UNet


class StepTimer:
    """Forward + backward + AdamW on random data at one shape, precision and layout: built
    (and torch.compile'd if asked) once, warmed up, then timed as often as wanted."""

    def __init__(self, model_kw: dict, *, size: tuple[int, int], batch: int,
                 device: torch.device, amp: torch.dtype | None, channels_last: bool,
                 compile: bool = False) -> None:
        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = UNet(**model_kw).to(device, memory_format=memory_format)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.model = torch.compile(model) if compile else model
        self.loss_fn = WeightedBCE(pos_weight=2.0, ignore_index=255).to(device)
        self.x = torch.randn(batch, 3, *size, device=device).contiguous(
            memory_format=memory_format)
        self.y = torch.randint(0, 2, (batch, *size), device=device)
        self.amp, self.device = amp, device
        for _ in range(2):  # warm-up: allocator, kernel selection, compilation
            self._step()

    def _step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(self.x)
        loss = self.loss_fn(logits, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def images_per_s(self, seconds: float) -> float:
        """Training images per second over at least `seconds` (and at least 2 steps)."""
        self._sync()
        steps, start = 0, time.perf_counter()
        while steps < 2 or time.perf_counter() - start < seconds:
            self._step()
            self._sync()
            steps += 1
        return steps * len(self.x) / (time.perf_counter() - start)


# (precision, channels_last) of the columns of the step table: fp32, fp32 NHWC, bf16 NHWC
STEP_VARIANTS = ((None, False), (None, True), (torch.bfloat16, True))


def step_speeds(device: torch.device, seconds: float) -> list[dict]:
    """Training-step images/s of the quickstart and baseline U-Nets in each STEP_VARIANTS."""
    on_cpu = device.type == "cpu"
    configs = [("quickstart d3 b16", unet_kwargs(depth=3, base_channels=16), (96, 192), 16),
               ("baseline d4 b32", unet_kwargs(depth=4, base_channels=32), (256, 512),
                4 if on_cpu else 16)]
    return [{"model": label, "size": size, "batch": batch,
             "images_per_s": [StepTimer(model_kw, size=size, batch=batch, device=device, amp=amp,
                                        channels_last=cl).images_per_s(seconds)
                              for amp, cl in STEP_VARIANTS]}
            for label, model_kw, size, batch in configs]


def model_flops(device: torch.device) -> dict[str, float]:
    """FLOPs per image of the baseline U-Net, forward and forward + backward, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(**BASELINE_UNET).to(device)
    x = torch.randn(2, 3, *BASELINE_SHAPE["image_size"], device=device)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as both:
        model(x).sum().backward()
    return {"forward": forward.get_total_flops() / len(x),
            "forward_backward": both.get_total_flops() / len(x)}


def matmul_peak(device: torch.device, dtype: torch.dtype | None, n: int = 2048,
                seconds: float = 2.0) -> float:
    """Measured FLOP/s of a square matmul in the training precision (the device's practical
    peak for the work a convolution becomes)."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    for _ in range(2):
        a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done * 2 * n**3 / (time.perf_counter() - start)
