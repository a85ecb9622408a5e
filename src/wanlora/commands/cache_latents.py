"""``wanlora-cache-latents``: encode every image and clip window of a dataset TOML with the VAE.

    wanlora-cache-latents --dataset_config dataset.toml --task t2v-A14B --vae Wan2.1_VAE.pth

One ``.safetensors`` per item and frame window in each entry's ``cache_directory`` (names and
layout: :mod:`wanlora.dataset.caches`; user guide: ``docs/caching.md``). Caches that are up to
date are skipped (always; ``--skip_existing`` is accepted for musubi-tuner users), stale ones
(changed size, frames, source file or VAE) are rebuilt, ``--recache`` rebuilds everything.
Exit status: 0 when every item is cached, 1 when any item failed, 2 for a bad dataset config, flag or ``--vae`` file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.commands.preflight import preflight_cache_latents
from wanlora.run_config import ModelFiles, default_device, device_option, dtype_option, group, option

__all__ = ["CacheLatentsConfig", "build_parser", "main"]


@dataclass(frozen=True)
class CacheLatentsConfig:
    """The settings of ``wanlora-cache-latents``."""

    model_files: ModelFiles = group(ModelFiles, "model files", include=("task", "ckpt_dir", "vae", "clip"), help={
        "task": "which Wan model the caches are for (required)",
        "vae": "Wan2.1_VAE.pth (t2v/i2v tasks) or Wan2.2_VAE.pth (ti2v-5B); not needed with --debug_mode",
        "clip": "i2v-14B / flf2v-14B: the CLIP image encoder whose features are cached "
                "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)"})
    dataset_config: Path | None = option(None, "dataset TOML (docs/dataset.md; required)")
    device: str | None = device_option("VAE device (default: cuda when available, else cpu)")
    vae_dtype: torch.dtype | None = dtype_option(None, "VAE compute dtype (default: fp32)")
    batch_size: int = option(1, "windows of equal shape encoded together")
    num_workers: int = option(2, "decoding processes (0: decode in this process)")
    skip_existing: bool = option(False, "accepted for compatibility: up-to-date caches are always skipped")
    recache: bool = option(False, "rebuild every cache, even up-to-date ones")
    debug_mode: str | None = option(None, "write the frames that would be trained to {cache_directory}/debug/ "
                                    "and encode nothing", choices=("image", "video"))
    no_progress: bool = option(False, "no progress bar")


def command_line() -> CommandLine:
    """The ``wanlora-cache-latents`` command line."""
    return CommandLine("wanlora-cache-latents", __doc__, CacheLatentsConfig)


def build_parser():
    """The argument parser of ``wanlora-cache-latents``."""
    return command_line().parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, cache, return the exit status; user errors (a bad dataset TOML or flag, a wrong
    ``--vae`` file) print ``wanlora-cache-latents: error: <message>`` and return 2
    (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-cache-latents", _main, argv)


def _main(argv: list[str] | None) -> int:
    ns = command_line().parse_namespace(argv, required=("dataset_config", "task"))
    setup_logging(ns.verbose)
    config = config_from_namespace(CacheLatentsConfig, ns)
    from wanlora.dataset.config import load_dataset_config
    from wanlora.conditioning import conditioning_for
    from wanlora.dataset.latent_caching import cache_latents

    files = config.model_files
    dataset = load_dataset_config(config.dataset_config, files.task)
    if config.batch_size < 1 or config.num_workers < 0:
        raise ValueError("--batch_size must be >= 1 and --num_workers >= 0")
    if config.debug_mode is None and not files.vae:
        raise ValueError("--vae is required (Wan2.1_VAE.pth or Wan2.2_VAE.pth) unless --debug_mode is set")
    # the VAE's kind and a non-empty dataset, before the VAE loads
    preflight_cache_latents(dataset, dataset.task, files.vae if config.debug_mode is None else None)
    vae = None
    if config.debug_mode is None:
        from wanlora.models import load_vae

        vae = load_vae(files.vae, dtype=config.vae_dtype or torch.float32, device=default_device(config.device))
    clip = None
    if config.debug_mode is None and conditioning_for(dataset.task).uses_clip:
        if not files.clip:
            raise ValueError(f"--clip is required for --task {dataset.task.name} (its caches hold CLIP image "
                             "features): models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or "
                             "clip_vision_h.safetensors")
        from wanlora.models import load_clip

        clip = load_clip(files.clip, dtype=torch.float32, device=default_device(config.device))
    report = cache_latents(dataset, vae, batch_size=config.batch_size, num_workers=config.num_workers,
                           force=config.recache, debug_mode=config.debug_mode, progress=not config.no_progress,
                           clip=clip)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
