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

import sys
from dataclasses import dataclass

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.lora.convert import convert_lora_files
from wanlora.lora.layouts import LAYOUTS
from wanlora.run_config import dtype_option, option

__all__ = ["ConvertConfig", "build_parser", "main"]


@dataclass(frozen=True)
class ConvertConfig:
    """The settings of ``wanlora-convert-lora``."""

    input: tuple[str, ...] = option((), "LoRA .safetensors file(s) or folder(s); X_high_noise brings X_low_noise "
                                    "along (required)", nargs="+")
    output: str | None = option(None, "output file (one input or one pair) or folder; default: X_<target>[_expert] "
                                "beside the input")
    target: str = option("comfy", "comfy: ComfyUI/diffusers/Wan2GP; diffusers: diffusers-native names; "
                         "default: lora_unet_* (musubi, all clients when fully covered)", choices=LAYOUTS)
    dtype: torch.dtype | None = dtype_option(None, "weight dtype of the output (default: keep the input's)")
    keep_alpha: bool = option(False, "--target comfy: keep .alpha keys instead of folding them into lora_A/lora_B")
    no_pair: bool = option(False, "do not look for the other expert's file")


def command_line() -> CommandLine:
    """The ``wanlora-convert-lora`` command line."""
    return CommandLine("wanlora-convert-lora", "Convert a Wan LoRA between the default (lora_unet_*), comfy "
                       "(diffusion_model.*) and diffusers layouts. Expert pairs (_high_noise/_low_noise) convert "
                       "together.", ConvertConfig)


def build_parser():
    """The argument parser of ``wanlora-convert-lora``."""
    return command_line().parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, convert, return the exit status (2 with a one-line message for a user error:
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-convert-lora", _main, argv)


def _main(argv: list[str] | None) -> int:
    ns = command_line().parse_namespace(argv, required=("input",))
    setup_logging(ns.verbose)
    config = config_from_namespace(ConvertConfig, ns)
    for dst in convert_lora_files(list(config.input), config.output, config.target, dtype=config.dtype,
                                  fold_alpha=not config.keep_alpha, pair=not config.no_pair):
        print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
