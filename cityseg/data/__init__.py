"""Data: the Cityscapes label table, layouts, synthetic streets, augmentations, datasets.

Importing this package registers every dataset and augmentation.
"""

from cityseg.data import datasets, transforms  # noqa: F401  (fills DATASETS, AUGMENTATIONS)
