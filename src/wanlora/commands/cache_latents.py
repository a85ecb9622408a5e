"""``wanlora-cache-latents``: encode every image and clip window of a dataset TOML with the VAE.

    wanlora-cache-latents --dataset_config dataset.toml --task t2v-A14B --vae Wan2.1_VAE.pth

One ``.safetensors`` per item and frame window in each entry's ``cache_directory`` (names and
layout: :mod:`wanlora.dataset.caches`; user guide: ``docs/caching.md``). Caches that are up to
date are skipped (always; ``--skip_existing`` is accepted for musubi-tuner users), stale ones
(changed size, frames, source file or VAE) are rebuilt, ``--recache`` rebuilds everything.
Exit status: 0 when every item is cached, 1 when any item failed, 2 for a bad dataset config, flag or ``--vae`` file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from wanlora.commands.cli import run_cli
from wanlora.tasks import task_names

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-cache-latents``."""
    p = argparse.ArgumentParser(prog="wanlora-cache-latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_config", required=True, help="dataset TOML (docs/dataset.md)")
    p.add_argument("--task", required=True, choices=task_names(), help="which Wan model the caches are for")
    p.add_argument("--vae", help="Wan2.1_VAE.pth (t2v/i2v tasks) or Wan2.2_VAE.pth (ti2v-5B); "
                   "not needed with --debug_mode")
    p.add_argument("--device", default=None, help="VAE device (default: cuda when available, else cpu)")
    p.add_argument("--vae_dtype", default="float32", choices=sorted(DTYPES), help="VAE compute dtype")
    p.add_argument("--batch_size", type=int, default=1, help="windows of equal shape encoded together")
    p.add_argument("--num_workers", type=int, default=2, help="decoding processes (0: decode in this process)")
    p.add_argument("--skip_existing", action="store_true",
                   help="accepted for compatibility: up-to-date caches are always skipped")
    p.add_argument("--recache", action="store_true", help="rebuild every cache, even up-to-date ones")
    p.add_argument("--debug_mode", choices=("image", "video"), default=None,
                   help="write the frames that would be trained to {cache_directory}/debug/ and encode nothing")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, cache, return the exit status; user errors (a bad dataset TOML or flag, a wrong
    ``--vae`` file) print ``wanlora-cache-latents: error: <message>`` and return 2
    (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-cache-latents", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from wanlora.dataset.config import load_dataset_config
    from wanlora.dataset.latent_caching import cache_latents

    config = load_dataset_config(args.dataset_config, args.task)
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("--batch_size must be >= 1 and --num_workers >= 0")
    vae = None
    if args.debug_mode is None:
        if not args.vae:
            raise ValueError("--vae is required (Wan2.1_VAE.pth or Wan2.2_VAE.pth) unless --debug_mode is set")
        from wanlora.models import load_vae

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae = load_vae(args.vae, dtype=getattr(torch, DTYPES[args.vae_dtype]), device=device)
    report = cache_latents(config, vae, batch_size=args.batch_size, num_workers=args.num_workers,
                           force=args.recache, debug_mode=args.debug_mode, progress=not args.no_progress)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
