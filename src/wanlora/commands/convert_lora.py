"""``wanlora-convert-lora``: rewrite a Wan LoRA in another key layout (and back).

Usage::

    wanlora-convert-lora --input my_lora.safetensors --target comfy
    wanlora-convert-lora --input out/style_high_noise.safetensors --target diffusers --output conv/
    wanlora-convert-lora --input conv/style_comfy_high_noise.safetensors --target default

The conversion is :mod:`wanlora.lora.convert`'s. Layouts (``wanlora.lora.layouts``): ``default`` (``lora_unet_*`` down/up/alpha: musubi, ComfyUI,
Wan2GP, and diffusers when every block has all 10 layers), ``comfy`` (``diffusion_model.*``
lora_A/lora_B, alpha folded: ComfyUI, diffusers, Wan2GP; any subset of modules), ``diffusers``
(diffusers' own names, alpha folded: diffusers only). The input layout is detected from its keys.

Expert pairs: an input named ``X_high_noise.safetensors`` (or ``X_low_noise``) brings its partner
along when it exists (``--no_pair`` turns that off); a folder as ``--input`` converts every
``.safetensors`` in it. Output names keep the expert suffix last:

* no ``--output``: ``X_<target>_high_noise.safetensors`` next to the input;
* ``--output`` a folder (exists, or has no ``.safetensors`` suffix): same file names in it;
* ``--output Y.safetensors`` with one input: exactly that file; with one pair:
  ``Y_high_noise.safetensors`` and ``Y_low_noise.safetensors`` (an expert suffix on Y is ignored).

Each written file's ``wan.pair_file`` names its partner's new file name.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from wanlora.commands.cli import run_cli
from wanlora.lora.convert import convert_lora_files
from wanlora.lora.layouts import LAYOUTS

__all__ = ["DTYPES", "main"]

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-convert-lora``."""
    p = argparse.ArgumentParser(
        prog="wanlora-convert-lora",
        description="Convert a Wan LoRA between the default (lora_unet_*), comfy (diffusion_model.*) "
        "and diffusers layouts. Expert pairs (_high_noise/_low_noise) convert together.",
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="LoRA .safetensors file(s) or folder(s); X_high_noise brings X_low_noise along")
    p.add_argument("--output", default=None,
                   help="output file (one input or one pair) or folder; default: X_<target>[_expert] "
                   "beside the input")
    p.add_argument("--target", choices=LAYOUTS, default="comfy",
                   help="comfy: ComfyUI/diffusers/Wan2GP (default); diffusers: diffusers-native names; "
                   "default: lora_unet_* (musubi, all clients when fully covered)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype of the output (default: keep the input's)")
    p.add_argument("--keep_alpha", action="store_true",
                   help="--target comfy: keep .alpha keys instead of folding them into lora_A/lora_B")
    p.add_argument("--no_pair", action="store_true",
                   help="do not look for the other expert's file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, convert, return the exit status (2 with a one-line message for a user error:
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-convert-lora", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for dst in convert_lora_files(args.input, args.output, args.target, dtype=DTYPES.get(args.dtype),
                                  fold_alpha=not args.keep_alpha, pair=not args.no_pair):
        print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
