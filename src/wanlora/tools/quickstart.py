"""The documented command chains, kept in one place.

The README's quick start and the guide's recipes are generated from :data:`RECIPES`; ``make demo``
(:mod:`wanlora.tools.demo`) and the end-to-end test run exactly these commands as subprocesses, and a
test checks that the Markdown files still contain the rendered blocks. So what a newcomer reads is
what the tests run.

Commands are written for ``bash`` with two variables: ``$MODELS`` (the folder of a model set made
by ``python -m wanlora.tools.tiny``, or your downloaded checkpoints laid out the same way) and ``$WORK``
(a work folder holding ``dataset.toml`` and ``prompts.txt``).

``python -m wanlora.tools.quickstart`` prints every recipe as Markdown; ``--check FILE`` exits non-zero
when FILE lacks one of the blocks it should hold; ``--sync ROOT`` rewrites the blocks in place
(after a recipe changed).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Recipe", "RECIPES", "render_block", "expand"]


@dataclass(frozen=True)
class Recipe:
    """A named chain of shell commands, each one list item one command line."""

    name: str
    task: str
    title: str
    commands: tuple[str, ...]
    doc: str  # the Markdown file (relative to the repository root) that shows this recipe

    def marker(self) -> str:
        return f"<!-- recipe:{self.name} -->"


_T5 = "--t5 $MODELS/models_t5_umt5-xxl-enc-bf16.pth --t5_tokenizer $MODELS/google/umt5-xxl"

T2V_BOTH_EXPERTS = Recipe(
    name="t2v-a14b-both-experts",
    task="t2v-A14B",
    title="Wan2.2 T2V-A14B: both experts in one run, two LoRAs",
    doc="README.md",
    commands=(
        "python -m wanlora.tools.tiny --task t2v-A14B --out $MODELS",
        "wanlora-cache-latents --task t2v-A14B --dataset_config $WORK/dataset.toml "
        "--vae $MODELS/Wan2.1_VAE.pth",
        f"wanlora-cache-text --dataset_config $WORK/dataset.toml {_T5}",
        "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m wanlora.train --task t2v-A14B "
        "--dit $MODELS/low_noise_model --dit_high_noise $MODELS/high_noise_model "
        "--dataset_config $WORK/dataset.toml --network_module networks.lora_wan "
        "--network_dim 8 --network_alpha 8 --learning_rate 2e-3 --max_train_steps 60 "
        "--timestep_sampling shift --discrete_flow_shift 5 "
        "--save_every_n_steps 30 --output_dir $WORK/output --output_name mylora "
        "--logging_dir $WORK/logs --sample_prompts $WORK/prompts.txt --sample_every_n_steps 30 "
        f"--vae $MODELS/Wan2.1_VAE.pth {_T5} --seed 42",
        "wanlora-generate --task t2v-A14B "
        "--dit $MODELS/low_noise_model --dit_high_noise $MODELS/high_noise_model "
        f"--vae $MODELS/Wan2.1_VAE.pth {_T5} "
        "--lora_weight $WORK/output/mylora_low_noise.safetensors "
        "--lora_weight_high_noise $WORK/output/mylora_high_noise.safetensors "
        '--prompt "a red ball bounces across a wooden floor" '
        "--video_size 64 64 --video_length 17 --infer_steps 8 --seed 42 "
        "--save_path $WORK/generated",
        "wanlora-convert-lora --input $WORK/output/mylora_high_noise.safetensors "
        "--output $WORK/comfy/mylora_high_noise.safetensors --target comfy",
    ),
)

I2V_ONE_EXPERT = Recipe(
    name="i2v-a14b-one-expert",
    task="i2v-A14B",
    title="Wan2.2 I2V-A14B: the low-noise expert alone",
    doc="docs/training.md",
    commands=(
        "python -m wanlora.tools.tiny --task i2v-A14B --out $MODELS",
        "wanlora-cache-latents --task i2v-A14B --dataset_config $WORK/dataset.toml "
        "--vae $MODELS/Wan2.1_VAE.pth",
        f"wanlora-cache-text --dataset_config $WORK/dataset.toml {_T5}",
        "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m wanlora.train --task i2v-A14B "
        "--dit $MODELS/low_noise_model --expert low "
        "--dataset_config $WORK/dataset.toml --network_module networks.lora_wan "
        "--network_dim 8 --network_alpha 8 --learning_rate 2e-3 --max_train_steps 12 "
        "--output_dir $WORK/output --output_name myi2v --logging_dir $WORK/logs --seed 42",
        "wanlora-generate --task i2v-A14B "
        "--dit $MODELS/low_noise_model --dit_high_noise $MODELS/high_noise_model "
        f"--vae $MODELS/Wan2.1_VAE.pth {_T5} "
        "--lora_weight $WORK/output/myi2v.safetensors "
        "--image_path $WORK/first_frame.png "
        '--prompt "the cat turns its head towards the sea" '
        "--video_size 64 48 --video_length 17 --infer_steps 8 --seed 42 "
        "--save_path $WORK/generated",
        "wanlora-convert-lora --input $WORK/output/myi2v.safetensors "
        "--output $WORK/comfy/myi2v.safetensors --target comfy",
    ),
)

_CLIP = "$MODELS/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
_CLIP_COMFY = "$MODELS/clip_vision_h.safetensors"

I2V_14B = Recipe(
    name="i2v-14b",
    task="i2v-14B",
    title="Wan2.1 I2V-14B: image to video with the CLIP image encoder",
    doc="docs/training.md",
    commands=(
        "python -m wanlora.tools.tiny --task i2v-14B --out $MODELS",
        "wanlora-cache-latents --task i2v-14B --dataset_config $WORK/dataset.toml "
        f"--vae $MODELS/Wan2.1_VAE.pth --clip {_CLIP}",
        f"wanlora-cache-text --dataset_config $WORK/dataset.toml {_T5}",
        "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m wanlora.train --task i2v-14B --dit $MODELS "
        "--dataset_config $WORK/dataset.toml --network_module networks.lora_wan "
        "--network_dim 8 --network_alpha 8 --learning_rate 2e-3 --max_train_steps 12 "
        "--output_dir $WORK/output --output_name myi2v14b --logging_dir $WORK/logs --seed 42",
        f"wanlora-generate --task i2v-14B --dit $MODELS --vae $MODELS/Wan2.1_VAE.pth {_T5} "
        f"--clip {_CLIP_COMFY} --lora_weight $WORK/output/myi2v14b.safetensors "
        "--image_path $WORK/first_frame.png "
        '--prompt "the cat turns its head towards the sea" '
        "--video_size 64 48 --video_length 17 --infer_steps 8 --seed 42 "
        "--save_path $WORK/generated",
        "wanlora-convert-lora --input $WORK/output/myi2v14b.safetensors "
        "--output $WORK/comfy/myi2v14b.safetensors --target comfy",
    ),
)

FLF2V_14B = Recipe(
    name="flf2v-14b",
    task="flf2v-14B",
    title="Wan2.1 FLF2V-14B: first and last frame to video",
    doc="docs/training.md",
    commands=(
        "python -m wanlora.tools.tiny --task flf2v-14B --out $MODELS",
        "wanlora-cache-latents --task flf2v-14B --dataset_config $WORK/dataset.toml "
        f"--vae $MODELS/Wan2.1_VAE.pth --clip {_CLIP_COMFY}",
        f"wanlora-cache-text --dataset_config $WORK/dataset.toml {_T5}",
        "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m wanlora.train --task flf2v-14B --dit $MODELS "
        "--dataset_config $WORK/dataset.toml --network_module networks.lora_wan "
        "--network_dim 8 --network_alpha 8 --learning_rate 2e-3 --max_train_steps 12 "
        "--output_dir $WORK/output --output_name myflf2v --logging_dir $WORK/logs --seed 42",
        f"wanlora-generate --task flf2v-14B --dit $MODELS --vae $MODELS/Wan2.1_VAE.pth {_T5} "
        f"--clip {_CLIP} --lora_weight $WORK/output/myflf2v.safetensors "
        "--image_path $WORK/first_frame.png --end_image_path $WORK/last_frame.png "
        '--prompt "the cat turns its head towards the sea" '
        "--video_size 64 48 --video_length 17 --infer_steps 8 --seed 42 "
        "--save_path $WORK/generated",
        "wanlora-convert-lora --input $WORK/output/myflf2v.safetensors "
        "--output $WORK/comfy/myflf2v.safetensors --target comfy",
    ),
)

T2V_1_3B_FC = Recipe(
    name="t2v-1.3b-fc",
    task="t2v-1.3B-FC",
    title="Wan2.1-Fun-1.3B-Control: text and a control video to video",
    doc="docs/fun_control.md",
    commands=(
        "python -m wanlora.tools.tiny --task t2v-1.3B-FC --out $MODELS",
        "wanlora-cache-latents --task t2v-1.3B-FC --dataset_config $WORK/dataset.toml "
        "--vae $MODELS/Wan2.1_VAE.pth",
        f"wanlora-cache-text --dataset_config $WORK/dataset.toml {_T5}",
        "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m wanlora.train --task t2v-1.3B-FC "
        "--dit $MODELS/diffusion_pytorch_model.safetensors "
        "--dataset_config $WORK/dataset.toml --network_module networks.lora_wan "
        "--network_dim 8 --network_alpha 8 --learning_rate 2e-3 --max_train_steps 12 "
        "--output_dir $WORK/output --output_name myfc --logging_dir $WORK/logs --seed 42",
        f"wanlora-generate --task t2v-1.3B-FC --dit $MODELS/diffusion_pytorch_model.safetensors "
        f"--vae $MODELS/Wan2.1_VAE.pth {_T5} --lora_weight $WORK/output/myfc.safetensors "
        "--control_path $WORK/control.mp4 "
        '--prompt "a skeleton dances in a studio" '
        "--video_size 48 64 --video_length 17 --infer_steps 8 --seed 42 "
        "--save_path $WORK/generated",
        "wanlora-convert-lora --input $WORK/output/myfc.safetensors "
        "--output $WORK/comfy/myfc.safetensors --target comfy",
    ),
)

I2V_14B_FC = Recipe(
    name="i2v-14b-fc",
    task="i2v-14B-FC",
    title="Wan2.1-Fun-14B-Control: a start image and a control video to video",
    doc="docs/fun_control.md",
    commands=(
        "python -m wanlora.tools.tiny --task i2v-14B-FC --out $MODELS",
        "wanlora-cache-latents --task i2v-14B-FC --dataset_config $WORK/dataset.toml "
        f"--vae $MODELS/Wan2.1_VAE.pth --clip {_CLIP}",
        f"wanlora-cache-text --dataset_config $WORK/dataset.toml {_T5}",
        "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m wanlora.train --task i2v-14B-FC --dit $MODELS "
        "--dataset_config $WORK/dataset.toml --network_module networks.lora_wan "
        "--network_dim 8 --network_alpha 8 --learning_rate 2e-3 --max_train_steps 12 "
        "--output_dir $WORK/output --output_name myfci2v --logging_dir $WORK/logs --seed 42",
        f"wanlora-generate --task i2v-14B-FC --dit $MODELS --vae $MODELS/Wan2.1_VAE.pth {_T5} "
        f"--clip {_CLIP} --lora_weight $WORK/output/myfci2v.safetensors "
        "--image_path $WORK/first_frame.png --control_path $WORK/control_frames "
        '--prompt "a skeleton dances in a studio" '
        "--video_size 64 48 --video_length 17 --infer_steps 8 --seed 42 "
        "--save_path $WORK/generated",
        "wanlora-merge-lora --task i2v-14B-FC --dit $MODELS --lora_weight $WORK/output/myfci2v.safetensors "
        "--save_merged_model $WORK/merged/dit.safetensors",
    ),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (T2V_BOTH_EXPERTS, I2V_ONE_EXPERT, I2V_14B, FLF2V_14B,
                                                   T2V_1_3B_FC, I2V_14B_FC)}


def render_block(recipe: Recipe) -> str:
    """The recipe as a Markdown bash block, preceded by its marker comment.

    Long command lines are wrapped with backslash continuations at flag boundaries.
    """
    lines = [recipe.marker(), "```bash"]
    for cmd in recipe.commands:
        # A flag and its values stay together; a new line starts before a flag that would
        # carry the line past 88 characters.
        groups: list[str] = []
        for word in shlex.split(cmd, posix=False):
            if groups and not word.startswith("--") and groups[-1].startswith("--"):
                groups[-1] += f" {word}"
            else:
                groups.append(word)
        out, cur = [], ""
        for g in groups:
            if cur and len(cur) + 1 + len(g) > 88 and g.startswith("--"):
                out.append(cur + " \\")
                cur = "    " + g
            else:
                cur = f"{cur} {g}" if cur else g
        out.append(cur)
        lines.extend(out)
    lines.append("```")
    return "\n".join(lines)


def expand(command: str, env: dict[str, str]) -> list[str]:
    """Split a recipe command into argv with ``$MODELS`` / ``$WORK`` substituted from ``env``.

    Raises:
        KeyError: the command uses a variable that ``env`` does not define.
    """
    argv = []
    for word in shlex.split(command):
        for var in ("MODELS", "WORK"):
            if f"${var}" in word:
                word = word.replace(f"${var}", env[var])
        argv.append(word)
    return argv


def missing_blocks(path: Path) -> list[str]:
    """Names of the recipes documented in ``path`` whose rendered block it does not contain."""
    text = path.read_text(encoding="utf-8")
    here = path.resolve().as_posix()
    return [r.name for r in RECIPES.values()
            if here.endswith("/" + r.doc) and render_block(r) not in text]


def sync_docs(root: Path) -> list[Path]:
    """Rewrite each recipe's block (marker line up to the closing fence) in its Markdown file.

    Returns the files that changed. Raises ``ValueError`` when a file lacks a recipe's marker.
    """
    changed = []
    for recipe in RECIPES.values():
        path = root / recipe.doc
        text = path.read_text(encoding="utf-8")
        pattern = re.escape(recipe.marker()) + r"\n```bash\n.*?```"
        new, n = re.subn(pattern, lambda m: render_block(recipe), text, flags=re.S)
        if n != 1:
            raise ValueError(f"{path}: needs exactly one '{recipe.marker()}' followed by a bash block")
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", type=Path, nargs="*", help="Markdown files to check")
    parser.add_argument("--sync", type=Path, metavar="ROOT",
                        help="rewrite the recipe blocks of the docs under this repository root")
    args = parser.parse_args(argv)
    if args.sync:
        for path in sync_docs(args.sync):
            print(f"updated {path}")
        return 0
    if args.check:
        bad = {str(p): missing_blocks(p) for p in args.check}
        bad = {k: v for k, v in bad.items() if v}
        for path, names in bad.items():
            print(f"{path}: out of date for {', '.join(names)}; run "
                  "`python -m wanlora.tools.quickstart --sync .`", file=sys.stderr)
        return 1 if bad else 0
    for r in RECIPES.values():
        print(f"### {r.title}  ({r.doc})\n\n{render_block(r)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
