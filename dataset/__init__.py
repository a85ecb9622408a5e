"""Datasets for wanlora: the dataset TOML, items and captions, buckets, frame windows, caches and
the training dataset (installed as ``wanlora.dataset``).

Public names::

    from wanlora.dataset import load_dataset_config, TrainingDataset

    config = load_dataset_config("dataset.toml", task="t2v-A14B")   # DatasetGroupConfig
    ds = TrainingDataset(config, seed=0)                            # batches of cached tensors

Modules: ``config`` (TOML schema and validation), ``items`` / ``captions`` (what is in an entry),
``buckets`` (aspect-ratio buckets), ``frames`` (frame windows, fps resampling), ``caches`` (file
names, metadata, staleness), ``masks`` (loss masks of ``mask_directory`` on the latent grid),
``latent_caching`` / ``text_caching`` (the two caching commands' library), ``training`` (the
training dataset).
"""

from wanlora.dataset.config import (
    DatasetConfig,
    DatasetConfigError,
    DatasetConfigWarning,
    DatasetGroupConfig,
    load_dataset_config,
)

__all__ = [
    "DatasetConfig",
    "DatasetConfigError",
    "DatasetConfigWarning",
    "DatasetGroupConfig",
    "load_dataset_config",
    "TrainingDataset",
    "MissingCachesError",
]


def __getattr__(name: str):
    # The training dataset imports torch and safetensors; load it on first use.
    if name in ("TrainingDataset", "MissingCachesError"):
        from wanlora.dataset import training

        return getattr(training, name)
    raise AttributeError(f"module 'wanlora.dataset' has no attribute {name!r}")
