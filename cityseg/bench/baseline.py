"""What the benchmarks measure: the baseline experiment, its shape and its U-Net (built once)."""

from __future__ import annotations

from pathlib import Path

BASELINE_FILE = Path(__file__).parents[2] / "experiments" / "baseline.yaml"
BASELINE_SHAPE = {"image_size": [256, 512], "depth": 4, "base_channels": 32, "batch": 8}


def unet_kwargs(*, depth: int, base_channels: int) -> dict:
    """The benchmarks' U-Net (binary, batch norm, transposed convolutions) at a size."""
    return dict(in_channels=3, out_channels=1, norm="batch", upsample="transpose", dropout=0.0,
                depth=depth, base_channels=base_channels)


BASELINE_UNET = unet_kwargs(depth=BASELINE_SHAPE["depth"],
                            base_channels=BASELINE_SHAPE["base_channels"])
