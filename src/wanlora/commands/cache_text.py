"""``wanlora-cache-text``: encode every caption of a dataset TOML with umT5.

    wanlora-cache-text --dataset_config dataset.toml --t5 models_t5_umt5-xxl-enc-bf16.pth

One ``{stem}_wan_te.safetensors`` per item (``context`` ``[L, 4096]``) in each entry's
``cache_directory``; identical captions are encoded once; caches whose caption or text encoder
changed are rebuilt, up-to-date ones skipped. Exit status: 0 ok, 1 when any item failed, 2 for a
bad dataset config, arguments or ``--t5`` file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from wanlora.commands.cli import run_cli

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-cache-text``."""
    p = argparse.ArgumentParser(prog="wanlora-cache-text", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_config", required=True, help="dataset TOML (docs/dataset.md)")
    p.add_argument("--t5", required=True, help="models_t5_umt5-xxl-enc-bf16.pth (or a transformers-layout .safetensors)")
    p.add_argument("--t5_tokenizer", default=None,
                   help="tokenizer folder (google/umt5-xxl); default: beside --t5, then the HF cache")
    p.add_argument("--task", default="t2v-A14B",
                   help="any task (captions do not depend on it; used to read the dataset config)")
    p.add_argument("--batch_size", type=int, default=16, help="distinct captions encoded together")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--t5_dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default float32, bfloat16 with --fp8_t5)")
    p.add_argument("--fp8_t5", action="store_true", help="store the T5 Linear weights in float8 (less memory)")
    p.add_argument("--skip_existing", action="store_true",
                   help="accepted for compatibility: up-to-date caches are always skipped")
    p.add_argument("--recache", action="store_true", help="rebuild every text cache")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, cache, return the exit status; user errors (a bad dataset TOML or flag, a wrong
    ``--t5`` / ``--t5_tokenizer``) print ``wanlora-cache-text: error: <message>`` and return 2
    (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-cache-text", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from wanlora.dataset.config import load_dataset_config
    from wanlora.dataset.text_caching import cache_text
    from wanlora.models import load_text_encoder

    config = load_dataset_config(args.dataset_config, args.task)
    if args.batch_size < 1:
        raise ValueError("--batch_size must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.t5_dtype]) if args.t5_dtype else None
    te = load_text_encoder(args.t5, tokenizer=args.t5_tokenizer, dtype=dtype, device=device, fp8=args.fp8_t5)
    report = cache_text(config, te, batch_size=args.batch_size, force=args.recache, progress=not args.no_progress)
    print(report.summary(noun="text cache(s)"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
