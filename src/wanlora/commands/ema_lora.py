"""``wanlora-ema-lora``: average a LoRA's step saves into a post-hoc EMA.

Usage::

    wanlora-ema-lora --input out/style-step*_high_noise.safetensors --sigma_rel 0.1 \\
        --output style_ema_high_noise.safetensors
    wanlora-ema-lora --input out/style-step*.safetensors --decay 0.999 --output style_ema.safetensors

The inputs are the ``--save_every_n_steps`` files of one LoRA (for an A14B pair, run it once per
expert); the weights and formulas are :mod:`wanlora.lora.posthoc_ema`'s: ``--decay`` the
exponential EMA per optimizer step, ``--sigma_rel`` / ``--gamma`` the power-function EMA of
Karras et al. (EDM2). The output keeps the last file's layout and metadata and records what was
averaged in ``wan.posthoc_ema``. It prints the steps and their weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.lora.posthoc_ema import posthoc_ema
from wanlora.run_config import dtype_option, option

__all__ = ["EmaLoraConfig", "build_parser", "main"]


@dataclass(frozen=True)
class EmaLoraConfig:
    """The settings of ``wanlora-ema-lora``."""

    input: tuple[str, ...] = option((), "step saves of one LoRA (.safetensors; required)", nargs="+")
    output: str | None = option(None, "the averaged LoRA file to write (required)")
    decay: float | None = option(None, "exponential EMA with this decay per optimizer step (e.g. 0.999)")
    sigma_rel: float | None = option(None, "power-function EMA (EDM2) of this length relative to the run "
                                     "(e.g. 0.05 to 0.15)")
    gamma: float | None = option(None, "power-function EMA (EDM2) with this exponent (instead of --sigma_rel)")
    dtype: torch.dtype | None = dtype_option(None, "weight dtype of the output (default: the inputs')")


def command_line() -> CommandLine:
    """The ``wanlora-ema-lora`` command line."""
    return CommandLine("wanlora-ema-lora", "Average the step saves of one LoRA into a post-hoc EMA "
                       "(exponential --decay, or power-function --sigma_rel / --gamma as in EDM2).", EmaLoraConfig)


def build_parser():
    """The argument parser of ``wanlora-ema-lora``."""
    return command_line().parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, average, return the exit status (2 with a one-line message for a user error:
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-ema-lora", _main, argv)


def _main(argv: list[str] | None) -> int:
    ns = command_line().parse_namespace(argv, required=("input", "output"))
    setup_logging(ns.verbose)
    c = config_from_namespace(EmaLoraConfig, ns)
    from wanlora.commands.preflight import check_output_file

    check_output_file(c.output, "--output")
    record = posthoc_ema(list(c.input), c.output, decay=c.decay, sigma_rel=c.sigma_rel, gamma=c.gamma, dtype=c.dtype)
    for step, coeff in zip(record["steps"], record["coefficients"]):
        print(f"step {step}: {coeff:.6f}")
    print(c.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
