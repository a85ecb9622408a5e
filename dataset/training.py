"""The training dataset: cached latents and text contexts, batched by bucket, resumable.

::

    ds = TrainingDataset("dataset.toml", task="i2v-A14B", seed=42)
    batch = ds[epoch * len(ds) + i]   # batch i of epoch `epoch`
    batch["latents"]   # float32 [B, C, T, h, w]
    batch["context"]   # list of B float32 [L_i, d_model]
    batch["y"]         # float32 [B, 20, T, h, w]   (i2v tasks only: the conditioning's cache keys)
    batch["keys"]      # list of B cache names (latent file stems)
    batch["mask"]      # float32 [B, 1, T, h, w] loss weights (entries with mask_directory only;
                       # an item without a mask file: all ones)

An *epoch* is every latent cache of every entry, repeated ``num_repeats`` times. Samples are
grouped by bucket (entry, frame count, width, height) so a batch has one shape; batches hold the
entry's ``batch_size`` samples (the last batch of a bucket may be smaller). Shuffling inside the
buckets and of the batch order depends only on ``(seed, epoch)``, so every process and every
DataLoader worker sees the same order, and a resumed run continues exactly where it stopped.

``ds[position]`` is the batch at global position ``epoch * len(ds) + index``: workers need no
state, which is what makes the order reproducible with any ``num_workers``, and a run resumes by
position alone (the trainer's ``EpochPositions`` sampler and Accelerate's ``skip_first_batches``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from wanlora.conditioning import conditioning_for
from wanlora.dataset import caches as C
from wanlora.dataset.config import DatasetGroupConfig, load_dataset_config
from wanlora.dataset.items import list_items
from wanlora.dataset.masks import find_mask, mask_index, mask_metadata
from wanlora.video_io import MediaError
from wanlora.tasks import Task, get_task

__all__ = ["TrainingDataset", "MissingCachesError", "Sample"]


class MissingCachesError(FileNotFoundError):
    """Caches needed for training are missing or stale; ``problems`` lists each, the message ends
    with ``heading`` and the commands that create them."""

    def __init__(self, problems: list[str], commands: list[str], heading: str = "create the caches with:"):
        self.problems = problems
        self.commands = commands
        lines = "\n".join(f"  - {p}" for p in problems)
        cmds = "\n".join(f"  {c}" for c in commands)
        super().__init__(f"{len(problems)} cache problem(s):\n{lines}\n{heading}\n{cmds}")


def _options_changed(saved: str | None, now: dict) -> str | None:
    """The dataset options (resolution, frames, ...) that differ between a latent cache's
    ``options`` metadata (JSON) and the entry's :meth:`DatasetConfig.shaping_options` now, as
    ``"resolution [64, 64] -> [96, 96]"``; None when equal or not recorded."""
    if not saved:
        return None
    try:
        old = json.loads(saved)
    except json.JSONDecodeError:
        return None
    diff = [f"{k} {old.get(k)} -> {v}" for k, v in now.items() if k in old and old[k] != v]
    return ", ".join(diff) or None


@dataclass(frozen=True)
class Sample:
    """One training sample: a latent cache (one item window) and its text cache."""

    latent: Path
    text: Path
    bucket: tuple[int, int, int, int]  # (entry index, frames, width, height)
    batch_size: int
    masked: bool = False  # its entry has a mask_directory: the batch carries loss weights

    @property
    def key(self) -> str:
        """The latent cache's file stem (names the sample in batches' ``keys``)."""
        return self.latent.name[: -len(".safetensors")]


class TrainingDataset(torch.utils.data.Dataset):
    """Batches of cached latents and contexts (see the module docstring).

    Args:
        config: a :class:`DatasetGroupConfig` or the path of the dataset TOML.
        task: the ``--task`` (needed with a path; checked against a config's task).
        seed: shuffling seed.
        shuffle: False keeps sorted order (buckets in order, samples by name).

    Raises:
        MissingCachesError: any item without its latent or text cache, with caches from another
            VAE kind or without the conditioning tensors the task needs (``y``), or whose text cache was made from another
            caption (edited since caching: stale); all are listed at once, with the
            ``wanlora-cache-latents`` / ``wanlora-cache-text`` commands that create them.
    """

    def __init__(self, config: DatasetGroupConfig | str | Path, task: str | Task | None = None,
                 seed: int = 0, shuffle: bool = True):
        if not isinstance(config, DatasetGroupConfig):
            if task is None:
                raise ValueError("TrainingDataset(path, task=...): the task is needed to read a dataset TOML")
            config = load_dataset_config(config, task)
        self.config = config
        self.task = get_task(task) if task is not None else config.task
        self.seed = int(seed)
        self.shuffle = shuffle
        self.conditioning = conditioning_for(self.task)
        self.samples = self._find_samples()
        self._order_cache: dict[int, list[list[int]]] = {}
        self._n_batches = len(self._batches_of(0))

    # -- discovery --------------------------------------------------------------------------------
    def _find_samples(self) -> list[Sample]:
        task = self.task
        cond = self.conditioning
        samples, problems = [], []
        latent_missing = text_missing = item_problems = False
        for ds in self.config.datasets:
            by_stem = C.latent_caches_in(ds.cache_directory, task.vae)
            masks = mask_index(ds.mask_directory, ds.kind) if ds.mask_directory is not None else None
            for item in list_items(ds):
                if item.problem:
                    problems.append(item.problem)
                    item_problems = True
                    continue
                try:
                    mask_meta = mask_metadata(ds.mask_directory, find_mask(masks, item.stem, item.path)
                                              if masks is not None else None)
                except MediaError as e:
                    problems.append(str(e))
                    item_problems = True
                    continue
                text = ds.cache_directory / C.text_cache_name(item.stem)
                text_problem = self._text_cache_problem(item, text)
                if text_problem:
                    problems.append(text_problem)
                    text_missing = True
                latents = by_stem.get(item.stem, [])
                if not latents:
                    problems.append(f"{item.path}: no latent cache {item.stem}_*_{C.vae_tag(task.vae)}.safetensors "
                                    f"in {ds.cache_directory}")
                    latent_missing = True
                    continue
                for p in latents:
                    meta = C.read_cache_metadata(p) or {}
                    if meta.get("format") != C.LATENT_FORMAT:
                        problems.append(f"{p}: not a wanlora latent cache (unreadable or old format)")
                        latent_missing = True
                        continue
                    changed = _options_changed(meta.get("options"), ds.shaping_options())
                    if changed:
                        problems.append(f"{p}: stale: the dataset TOML changed since wanlora-cache-latents ran "
                                        f"({changed}); it rebuilds stale caches")
                        latent_missing = True
                        continue
                    if any(meta.get(f"has_{k}") != "1" for k in cond.cache_keys):
                        problems.append(f"{p}: made for task {meta.get('task')} without the {cond.label} "
                                        f"that {task.name} needs")
                        latent_missing = True
                        continue
                    if mask_meta and meta.get("mask") != mask_meta["mask"]:
                        why = ("was made without the masks of mask_directory" if meta.get("mask") is None
                               else "is stale: its mask was added, changed or removed since caching")
                        problems.append(f"{p}: {why} ({ds.name}.mask_directory {ds.mask_directory}); "
                                        "wanlora-cache-latents rebuilds it")
                        latent_missing = True
                        continue
                    info = C.parse_latent_cache_name(p.name)
                    samples.append(Sample(p, text, (ds.index, info["frames"], info["width"], info["height"]),
                                          ds.batch_size, masked=bool(mask_meta)))
        if problems:
            cfg = self.config.path
            commands = []
            if latent_missing or item_problems:
                vae = "Wan2.1_VAE.pth" if task.vae == "wan2.1" else "Wan2.2_VAE.pth"
                commands.append(f"wanlora-cache-latents --dataset_config {cfg} --task {task.name} --vae path/to/{vae}")
            if text_missing or item_problems:
                commands.append(f"wanlora-cache-text --dataset_config {cfg} --t5 path/to/models_t5_umt5-xxl-enc-bf16.pth")
            heading = ("fix the items above (captions, file names), then create their caches with:" if item_problems
                       else "create the caches with:")
            raise MissingCachesError(problems, commands, heading)
        if not samples:
            raise MissingCachesError([f"{self.config.path}: the dataset has no items"],
                                     ["add images or clips to the folders named in the dataset config"])
        return samples

    @staticmethod
    def _text_cache_problem(item, text: Path) -> str | None:
        """Why the text cache ``text`` of ``item`` cannot be used (missing, foreign, or made from
        another caption: the caption was edited after ``wanlora-cache-text`` ran), else None. Reads
        only the safetensors header."""
        if not text.is_file():
            return f"{item.path}: no text cache {text.name} in {text.parent}"
        meta = C.read_cache_metadata(text) or {}
        if meta.get("format") != C.TEXT_FORMAT:
            return f"{text}: not a wanlora text cache (unreadable or old format)"
        if meta.get("caption") != item.caption:
            return (f"{item.path}: text cache {text.name} is stale: the caption changed since "
                    "wanlora-cache-text ran (it rebuilds stale caches)")
        return None

    # -- order --------------------------------------------------------------------------------------
    def _batches_of(self, epoch: int) -> list[list[int]]:
        """Sample indices of each batch of ``epoch`` (deterministic in ``(seed, epoch)``)."""
        if epoch in self._order_cache:
            return self._order_cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        repeats = {d.index: d.num_repeats for d in self.config.datasets}
        buckets: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.samples):
            buckets.setdefault(s.bucket, []).extend([i] * repeats[s.bucket[0]])
        batches: list[list[int]] = []
        for key in sorted(buckets):
            idx = np.asarray(buckets[key])
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            bs = self.samples[idx[0]].batch_size
            batches += [idx[k : k + bs].tolist() for k in range(0, len(idx), bs)]
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if len(self._order_cache) > 4:
            self._order_cache.clear()
        self._order_cache[epoch] = batches
        return batches

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._n_batches

    @property
    def num_samples(self) -> int:
        """Samples per epoch (repeats counted)."""
        return sum(len(b) for b in self._batches_of(0))

    def __getitem__(self, position: int) -> dict:
        """The batch at global position ``epoch * len(self) + index``."""
        epoch, index = divmod(int(position), self._n_batches)
        return self.load_batch([self.samples[i] for i in self._batches_of(epoch)[index]])

    def load_batch(self, samples: list[Sample]) -> dict:
        """Read and stack the caches of ``samples`` (one bucket): ``latents``, ``context``, ``keys``,
        the task's conditioning tensors (:attr:`wanlora.conditioning.Conditioning.cache_keys`) and, for
        entries with ``mask_directory``, the loss weights ``mask`` (all ones where an item has no mask)."""
        keys = self.conditioning.cache_keys
        lat, extra, ctx, masks = [], {k: [] for k in keys}, [], []
        for s in samples:
            t = load_file(str(s.latent))
            if not all(bool(torch.isfinite(v).all()) for v in t.values() if v.is_floating_point()):
                raise ValueError(f"{s.latent}: the cached latent holds NaN or Inf values (a VAE overflow in "
                                 "half precision?); delete it and run wanlora-cache-latents again with "
                                 "--vae_dtype float32")
            lat.append(t["latents"].float())
            if s.masked:
                masks.append(t["mask"].float() if "mask" in t else torch.ones(1, *t["latents"].shape[1:]))
            for k in keys:
                extra[k].append(t[k].float())
            ctx.append(load_file(str(s.text))["context"].float())
        batch = {"latents": torch.stack(lat), "context": ctx, "keys": [s.key for s in samples]}
        batch.update({k: torch.stack(v) for k, v in extra.items()})
        if masks:
            batch["mask"] = torch.stack(masks)
        return batch
