"""``wanlora-cache-latents``: encode every image and clip window of a dataset TOML with the VAE.

    wanlora-cache-latents --dataset_config dataset.toml --task t2v-A14B --vae Wan2.1_VAE.pth
    wanlora-cache-latents --dataset_config dataset.toml --vae Wan2.1_VAE.pth --i2v    # musubi-tuner's way

Without ``--task`` the caches are made for the task the ``--vae`` file and musubi-tuner's switches
give (:func:`task_for_caching`): the Wan2.1 VAE caches latents only (every T2V task), with ``--i2v``
also the I2V conditioning ``y`` (i2v-A14B), with ``--clip`` also the CLIP features (i2v-14B); the
Wan2.2 VAE caches for ti2v-5B. A dataset with ``control_directory`` caches for Fun-Control
(t2v-14B-FC, or i2v-14B-FC with ``--clip``), as musubi-tuner caches control latents whenever the
dataset has control clips.

One ``.safetensors`` per item and frame window in each entry's ``cache_directory`` (names and
layout: :mod:`wanlora.dataset.caches`; user guide: ``docs/caching.md``). Caches that are up to
date are skipped (always; ``--skip_existing`` is accepted for musubi-tuner users), stale ones
(changed size, frames, source file or VAE) are rebuilt, ``--recache`` rebuilds everything.
Exit status: 0 when every item is cached, 1 when any item failed, 2 for a bad dataset config, flag or ``--vae`` file.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.commands.preflight import preflight_cache_latents
from wanlora.run_config import ModelFiles, default_device, device_option, dtype_option, group, option

__all__ = ["CacheLatentsConfig", "build_parser", "main", "task_for_caching"]

log = logging.getLogger("wanlora.commands.cache_latents")


@dataclass(frozen=True)
class CacheLatentsConfig:
    """The settings of ``wanlora-cache-latents``."""

    model_files: ModelFiles = group(ModelFiles, "model files", include=("task", "ckpt_dir", "vae", "clip"), help={
        "task": "which Wan model the caches are for (default: from the --vae file, --i2v and --clip, as "
                "musubi-tuner decides it)",
        "vae": "Wan2.1_VAE.pth (t2v/i2v tasks) or Wan2.2_VAE.pth (ti2v-5B); not needed with --debug_mode",
        "clip": "i2v-14B / flf2v-14B: the CLIP image encoder whose features are cached "
                "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)"})
    dataset_config: Path | None = option(None, "dataset TOML (docs/dataset.md; required)")
    i2v: bool = option(False, "musubi-tuner's switch: without --task, cache the I2V conditioning of the first "
                       "frame (the Wan2.1 VAE: i2v-A14B; with --clip: i2v-14B)")
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
    ns = command_line().parse_namespace(argv, required=("dataset_config",))
    setup_logging(ns.verbose)
    config = config_from_namespace(CacheLatentsConfig, ns)
    from wanlora.dataset.config import load_dataset_config
    from wanlora.conditioning import conditioning_for
    from wanlora.dataset.latent_caching import cache_latents

    files = config.model_files
    task = files.task
    if task is None or config.i2v:
        vae_kind = None
        if files.vae and task is None:
            from wanlora.commands.preflight import vae_kind_of

            if not Path(files.vae).exists():
                raise FileNotFoundError(f"--vae {files.vae}: no such file")
            vae_kind = vae_kind_of(files.vae)
        from wanlora.dataset.config import has_control_directory

        task = task_for_caching(task, vae_kind, config.i2v, bool(files.clip),
                                control=task is None and has_control_directory(config.dataset_config))
    dataset = load_dataset_config(config.dataset_config, task)
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


def task_for_caching(task: str | None, vae_kind: str | None, i2v: bool = False, clip: bool = False,
                     control: bool = False) -> str:
    """The task ``wanlora-cache-latents`` caches for: ``--task`` when given, else the one the VAE file's
    kind and musubi-tuner's switches name (musubi's ``wan_cache_latents.py``: ``--i2v`` caches the
    first frame's conditioning, ``--clip`` implies ``--i2v`` and adds the CLIP features).

    ================  =========  ========  ===========================================================
    VAE (``vae_kind``)  ``--i2v``  ``--clip``  task (what the caches hold)
    ================  =========  ========  ===========================================================
    ``wan2.1``        no         no        ``t2v-A14B``: latents only, the caches of every T2V task
                                           (t2v-A14B, t2v-14B, t2v-1.3B: same VAE, size unit, fps)
    ``wan2.1``        yes        no        ``i2v-A14B``: latents and ``y``
    ``wan2.1``        any        yes       ``i2v-14B``: latents, ``y`` and ``clip_fea`` (FLF2V-14B's
                                           first-and-last-frame caches need ``--task flf2v-14B``)
    ``wan2.2``        any        no        ``ti2v-5B``: latents (the first latent frame is the image
                                           conditioning, so ``--i2v`` changes nothing)
    ================  =========  ========  ===========================================================

    With ``control`` (the dataset names control clips: ``control_directory``) the Wan2.1 VAE caches
    for Fun-Control: ``t2v-14B-FC`` (latents and ``latents_control``, the caches of both T2V
    Fun-Control tasks), with ``--clip`` ``i2v-14B-FC`` (also ``start_latent`` and ``clip_fea``).

    Args:
        task: ``--task`` or None; vae_kind: ``"wan2.1"`` / ``"wan2.2"`` from the ``--vae`` header
            (:func:`wanlora.commands.preflight.vae_kind_of`), None without ``--vae``.
    Returns:
        the task name.
    Raises:
        ValueError: nothing to decide from (no ``--task``, no ``--vae``), ``--clip`` or control clips
            with the Wan2.2 VAE, or ``--i2v`` with a ``--task`` that has no image conditioning.
    """
    from wanlora.conditioning import conditioning_for
    from wanlora.tasks import get_task

    if task is not None:
        if i2v and conditioning_for(get_task(task)).kind == "none":
            raise ValueError(f"--i2v asks for the I2V conditioning but --task {task} has none; drop --i2v, or use "
                             "--task i2v-A14B (Wan2.2) / i2v-14B (Wan2.1, with --clip)")
        return get_task(task).name
    if vae_kind is None:
        raise ValueError("--task is needed without --vae (the VAE file's kind decides the task otherwise): "
                         "e.g. --task t2v-A14B")
    if vae_kind == "wan2.2":
        if control:
            raise ValueError("the dataset names control clips (control_directory) but the Fun-Control models use the "
                             "Wan2.1 VAE: pass Wan2.1_VAE.pth, or --task for another model")
        if clip:
            raise ValueError("--clip: no task of the Wan2.2 VAE uses CLIP image features (ti2v-5B does not); drop "
                             "--clip, or pass the Wan2.1 VAE for i2v-14B")
        name = "ti2v-5B"
    elif control:
        name = "i2v-14B-FC" if clip else "t2v-14B-FC"
    else:
        name = "i2v-14B" if clip else "i2v-A14B" if i2v else "t2v-A14B"
    why = (f"the {vae_kind} VAE" + (" and --clip" if clip else " and --i2v" if i2v else "")
           + (" and the dataset's control_directory" if control else ""))
    serves = " (the same caches serve t2v-14B and t2v-1.3B)" if name == "t2v-A14B" else \
        " (the same caches serve t2v-1.3B-FC)" if name == "t2v-14B-FC" else \
        " (for flf2v-14B pass --task flf2v-14B)" if name == "i2v-14B" else ""
    log.info("no --task: caching for %s, from %s%s", name, why, serves)
    return name


if __name__ == "__main__":
    sys.exit(main())
