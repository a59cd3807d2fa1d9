"""Models. Importing this package registers every model in MODELS.

- unet.py: the U-Net (plain, or decoding a torchvision encoder's stages) and its params
- encoders.py: the torchvision encoders, their stages, channels and input normalisation
"""

from cityseg.models import unet  # noqa: F401  (fills MODELS)
