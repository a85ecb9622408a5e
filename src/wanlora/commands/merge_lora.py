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

import argparse
import logging
import sys

import torch

from wanlora.commands.cli import run_cli
from wanlora.lora.apply import per_file_values
from wanlora.lora.merge import MergeError, dit_expert_from_path, merge_loras
from wanlora.tasks import EXPERTS, task_names

__all__ = ["MergeError", "dit_expert_from_path", "merge_loras", "main"]

log = logging.getLogger("wanlora.commands.merge_lora")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-merge-lora``."""
    p = argparse.ArgumentParser(
        prog="wanlora-merge-lora",
        description="Merge Wan LoRAs into a DiT checkpoint and write a new .safetensors (streamed).",
    )
    p.add_argument("--dit", required=True, help="DiT checkpoint: .safetensors, shard index .json or folder")
    p.add_argument("--task", required=True, choices=task_names())
    p.add_argument("--expert", choices=EXPERTS, default=None,
                   help="which A14B expert --dit is (default: from 'high_noise'/'low_noise' in its path)")
    p.add_argument("--lora_weight", nargs="+", required=True, help="LoRA file(s), any layout")
    p.add_argument("--lora_multiplier", nargs="+", type=float, default=None,
                   help="one multiplier per LoRA, or one for all (default 1.0 each)")
    p.add_argument("--save_merged_model", required=True, help="output .safetensors")
    p.add_argument("--save_dtype", choices=sorted(_DTYPES), default=None,
                   help="dtype of the written weights (default: the checkpoint's)")
    p.add_argument("--force", action="store_true",
                   help="merge a LoRA made for another task/expert; skip modules that do not fit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, merge, return the exit status (2 with a one-line message for a user error:
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-merge-lora", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mults = per_file_values(args.lora_multiplier, len(args.lora_weight), 1.0, "--lora_multiplier")
    summary = merge_loras(args.dit, list(zip(args.lora_weight, mults)), args.save_merged_model,
                          args.task, expert=args.expert, save_dtype=_DTYPES.get(args.save_dtype),
                          force=args.force)
    log.info("merged %d modules into %s (%d tensors)", summary["merged_modules"],
             args.save_merged_model, summary["tensors"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
