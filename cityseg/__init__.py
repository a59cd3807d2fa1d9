"""cityseg: config-driven U-Net experiments for Cityscapes street scenes."""

__version__ = "0.1.0"
