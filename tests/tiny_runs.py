"""Runs of the commands on the tiny model sets in tests: the command line of a small training run,
and the header metadata of the ``.safetensors`` files the commands write (caches, LoRAs).
"""

from __future__ import annotations

import os

from safetensors import safe_open


def train_argv(flags: dict[str, str], out: str | os.PathLike, *extra: str, dataset: str | os.PathLike = "unused.toml",
               dim: int = 4, lr: str = "5e-3", seed: int = 7) -> list[str]:
    """``wanlora-train`` arguments of a small LoRA run on a tiny model set.

    Args:
        flags: the set's ``manifest.json`` flags (its ``--task`` and ``--dit`` are used).
        out: ``--output_dir``; the LoRA is ``out/lora.safetensors`` (``lora_<expert>`` for two experts).
        extra: more arguments, last (a flag given again here wins).
        dataset: ``--dataset_config`` (the default names no file: for tests that pass ``dataset=``
            to :func:`wanlora.training.trainer.train`).
        dim: ``--network_dim`` and ``--network_alpha`` (scale 1).
        lr: ``--learning_rate``. seed: ``--seed``. The data loads in the main process.
    """
    return ["--task", flags["--task"], "--dit", flags["--dit"], "--dataset_config", str(dataset),
            "--output_dir", str(out), "--output_name", "lora", "--network_dim", str(dim), "--network_alpha", str(dim),
            "--learning_rate", lr, "--seed", str(seed), "--max_data_loader_n_workers", "0", *extra]


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's header (``{}`` when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
