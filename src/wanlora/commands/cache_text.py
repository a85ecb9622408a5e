"""``wanlora-cache-text``: encode every caption of a dataset TOML with umT5.

    wanlora-cache-text --dataset_config dataset.toml --t5 models_t5_umt5-xxl-enc-bf16.pth

One ``{stem}_wan_te.safetensors`` per item (``context`` ``[L, 4096]``) in each entry's
``cache_directory``; identical captions are encoded once; caches whose caption or text encoder
changed are rebuilt, up-to-date ones skipped. Exit status: 0 ok, 1 when any item failed, 2 for a
bad dataset config, arguments or ``--t5`` file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.run_config import ModelFiles, default_device, device_option, dtype_option, group, option

__all__ = ["CacheTextConfig", "build_parser", "main"]


@dataclass(frozen=True)
class CacheTextConfig:
    """The settings of ``wanlora-cache-text``."""

    model_files: ModelFiles = group(ModelFiles, "model files", include=("task", "ckpt_dir", "t5", "t5_tokenizer"),
                                     defaults={"task": "t2v-A14B"}, help={
        "task": "any task (captions do not depend on it; used to read the dataset config)",
        "t5": "models_t5_umt5-xxl-enc-bf16.pth (or a transformers-layout .safetensors; required)"})
    dataset_config: Path | None = option(None, "dataset TOML (docs/dataset.md; required)")
    batch_size: int = option(16, "distinct captions encoded together")
    device: str | None = device_option()
    t5_dtype: torch.dtype | None = dtype_option(None, "compute dtype (default fp32, bf16 with --fp8_t5)")
    fp8_t5: bool = option(False, "store the T5 Linear weights in float8 (less memory)")
    skip_existing: bool = option(False, "accepted for compatibility: up-to-date caches are always skipped")
    recache: bool = option(False, "rebuild every text cache")
    no_progress: bool = option(False, "no progress bar")


def command_line() -> CommandLine:
    """The ``wanlora-cache-text`` command line."""
    return CommandLine("wanlora-cache-text", __doc__, CacheTextConfig)


def build_parser():
    """The argument parser of ``wanlora-cache-text``."""
    return command_line().parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, cache, return the exit status; user errors (a bad dataset TOML or flag, a wrong
    ``--t5`` / ``--t5_tokenizer``) print ``wanlora-cache-text: error: <message>`` and return 2
    (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-cache-text", _main, argv)


def _main(argv: list[str] | None) -> int:
    ns = command_line().parse_namespace(argv, required=("dataset_config", "t5"))
    setup_logging(ns.verbose)
    config = config_from_namespace(CacheTextConfig, ns)
    from wanlora.dataset.config import load_dataset_config
    from wanlora.dataset.text_caching import cache_text
    from wanlora.models import load_text_encoder

    files = config.model_files
    dataset = load_dataset_config(config.dataset_config, files.task)
    if config.batch_size < 1:
        raise ValueError("--batch_size must be >= 1")
    te = load_text_encoder(files.t5, tokenizer=files.t5_tokenizer, dtype=config.t5_dtype,
                           device=default_device(config.device), fp8=config.fp8_t5)
    report = cache_text(dataset, te, batch_size=config.batch_size, force=config.recache,
                        progress=not config.no_progress)
    print(report.summary(noun="text cache(s)"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
