"""Models. Importing this package registers every model in MODELS."""

from cityseg.models import unet  # noqa: F401  (fills MODELS)
