"""``wanlora-merge-lora``: bake LoRAs into a Wan DiT checkpoint.

Usage::

    wanlora-merge-lora --task t2v-A14B --dit Wan2.2-T2V-A14B/high_noise_model \\
        --lora_weight style_high_noise.safetensors --lora_multiplier 1.0 \\
        --save_merged_model wan2.2_t2v_high_noise_style.safetensors --save_dtype bf16

The math, the streaming and the checks are :func:`wanlora.lora.merge.merge_loras`'s (float32
``W + sum_i multiplier_i · (alpha_i / rank_i) · up_i @ down_i``, cast once; refuses a LoRA of another
task or expert unless ``--force``). ``--lora_multiplier``: one value per ``--lora_weight``, or one
for all (:func:`wanlora.lora.apply.per_file_values`, the rule of ``wanlora-generate`` too).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.commands.preflight import preflight_merge
from wanlora.lora.apply import per_file_values
from wanlora.lora.merge import MergeError, dit_expert_from_path, merge_loras
from wanlora.run_config import ModelFiles, dtype_option, group, option
from wanlora.tasks import EXPERTS

__all__ = ["MergeConfig", "MergeError", "dit_expert_from_path", "merge_loras", "build_parser", "main"]

log = logging.getLogger("wanlora.commands.merge_lora")


@dataclass(frozen=True)
class MergeConfig:
    """The settings of ``wanlora-merge-lora``."""

    model_files: ModelFiles = group(ModelFiles, "model", include=("task", "ckpt_dir", "dit"), help={
        "task": "which Wan model (required)",
        "dit": "DiT checkpoint: .safetensors, shard index .json or folder (required)"})
    expert: str | None = option(None, "which A14B expert --dit is (default: from 'high_noise'/'low_noise' in "
                                "its path)", choices=EXPERTS)
    lora_weight: tuple[str, ...] = option((), "LoRA file(s), any layout (required)", nargs="+")
    lora_multiplier: tuple[float, ...] = option((), "one multiplier per LoRA, or one for all (default 1.0 each)",
                                                nargs="+")
    save_merged_model: str | None = option(None, "output .safetensors (required)")
    save_dtype: torch.dtype | None = dtype_option(None, "dtype of the written weights (default: the checkpoint's)")
    force: bool = option(False, "merge a LoRA made for another task/expert; skip modules that do not fit")


def command_line() -> CommandLine:
    """The ``wanlora-merge-lora`` command line."""
    return CommandLine("wanlora-merge-lora", "Merge Wan LoRAs into a DiT checkpoint and write a new "
                       ".safetensors (streamed).", MergeConfig)


def build_parser():
    """The argument parser of ``wanlora-merge-lora``."""
    return command_line().parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, merge, return the exit status (2 with a one-line message for a user error:
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-merge-lora", _main, argv)


def _main(argv: list[str] | None) -> int:
    ns = command_line().parse_namespace(argv, required=("dit", "task", "lora_weight", "save_merged_model"))
    setup_logging(ns.verbose)
    config = config_from_namespace(MergeConfig, ns)
    weights = config.lora_weight
    mults = per_file_values(list(config.lora_multiplier) or None, len(weights), 1.0, "--lora_multiplier")
    preflight_merge(config.model_files.dit, config.save_merged_model, config.save_dtype)
    summary = merge_loras(config.model_files.dit, list(zip(weights, mults)), config.save_merged_model,
                          config.model_files.task, expert=config.expert, save_dtype=config.save_dtype,
                          force=config.force)
    log.info("merged %d modules into %s (%d tensors)", summary["merged_modules"],
             config.save_merged_model, summary["tensors"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
