"""Data: from a dataset's files to the batches a run trains on. One question per module:

- cityscapes.py: the Cityscapes label table: official ids <-> train ids, colours, masks decoded
- tasks.py: what a task means, one table entry per task (labels, metrics, drawing)
- layouts.py: where a copy keeps its files (official, folders, pairs); one sample read
- synthetic.py: procedural street scenes, written in the official layout
- check.py: `cityseg data check`, every sample read and reported
- cache.py: decode once (the cache opened and verified); cache_build.py: how it is written
- transforms.py: the augmentations (torchvision in workers, each with its batched form)
- device_augment.py: the augmentations batched with kornia on the training device
- datasets.py: the dataset registry entries (the `data:` section) and a run's two splits
- loader.py: what a DataLoader is made of: readers, dataset, samplers, worker count

Importing this package registers every dataset and augmentation.
"""

from cityseg.data import datasets, transforms  # noqa: F401  (fills DATASETS, AUGMENTATIONS)
