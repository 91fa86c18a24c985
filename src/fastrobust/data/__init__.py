"""Datasets as uint8 tensors, decoded once and cached; DeviceLoader batches on the device.

See docs/data.md for where files are looked for, the cache and the loader.
"""

from fastrobust.data.datasets import (
    Dataset,
    ImageSet,
    available_datasets,
    balanced_head,
    load_dataset,
    resolve_cache_dir,
    resolve_root,
)
from fastrobust.data.loader import DeviceLoader

__all__ = [
    "Dataset",
    "DeviceLoader",
    "ImageSet",
    "available_datasets",
    "balanced_head",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_root",
]
