"""``wanlora-generate``: text-to-video, image-to-video and text-to-image with Wan DiTs and LoRAs.

Examples::

    wanlora-generate --task t2v-A14B --dit low_noise_model/ --dit_high_noise high_noise_model/ \\
        --vae Wan2.1_VAE.pth --t5 models_t5_umt5-xxl-enc-bf16.pth --prompt "a cat on a skateboard" \\
        --video_size 480 832 --video_length 81 --seed 42 --save_path outputs/
    wanlora-generate --task i2v-A14B ... --image_path cat.jpg       # size from the image's aspect
    wanlora-generate --task ti2v-5B ... --video_length 1              # text-to-image (PNG)
    wanlora-generate ... --from_file prompts.txt                      # batch, models loaded once
    wanlora-generate ... --lora_weight my_low.safetensors --lora_weight_high_noise my_high.safetensors

The script parses its flags into a :class:`GenerateConfig` and calls the library: the prompt files
(:mod:`wanlora.inference.prompts`), the LoRA plan (:mod:`wanlora.lora.apply`), the models and the
rendering (:mod:`wanlora.inference.session`, over :mod:`wanlora.inference.pipeline`). See
``docs/generation.md``.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, replace

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import USER_ERRORS, print_user_error, run_cli
from wanlora.commands.preflight import preflight_generate
from wanlora.conditioning import conditioning_for
from wanlora.inference.outputs import OUTPUT_TYPES
from wanlora.inference.pipeline import GenerationRequest
from wanlora.inference.prompts import PromptSpec, read_prompt_file
from wanlora.inference.session import GenerationSession, load_pipeline, requests_for, share_random_seeds
from wanlora.lora.apply import plan_loras
from wanlora.models.distributed import init_from_env, parallel_layout
from wanlora.run_config import (CompileOptions, ModelFiles, ParallelOptions, attn_option, default_device, device_option,
                                dtype_option, group, option)
from wanlora.tasks import get_task
from wanlora.training.memory import estimate_for_generation

__all__ = ["GenerateConfig", "build_parser", "parse_args", "request_defaults", "main"]

PROG = "wanlora-generate"
logger = logging.getLogger("wanlora.commands.generate")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how the models run."""

    attn_mode: str = attn_option()
    device: str | None = device_option()
    dtype: torch.dtype | None = dtype_option(None, "DiT/T5 dtype (default bf16 on CUDA, float32 on CPU)")
    no_offload: bool = option(False, "keep every model on the device (default on CUDA: the text encoder and "
                              "the idle expert go to the CPU)")
    fp8_base: bool = option(False, "store the DiT blocks' Linear weights in float8_e4m3fn (half of bf16), computed "
                            "in --dtype; LoRAs are applied as hooks (docs/memory.md)", aliases=("--fp8",))
    fp8_scaled: bool = option(False, "fp8 with one float32 scale per output channel (implies --fp8_base)")
    blocks_to_swap: int = option(0, "DiT blocks kept in pinned host memory and copied to the GPU ahead of use "
                                 "(both experts share the device slots)")
    estimate_memory: bool = option(False, "print the predicted GPU and host memory peaks of the first prompt's "
                                   "size and exit")

    @property
    def fp8(self) -> str | None:
        """``load_dit``'s ``fp8``: ``"scaled"``, ``"base"`` or ``None``."""
        return "scaled" if self.fp8_scaled else ("base" if self.fp8_base else None)


@dataclass(frozen=True)
class RequestOptions:
    """What to generate (a prompt file's inline options win over these per line)."""

    prompt: str | None = option(None, "the prompt (or --from_file / --interactive)")
    negative_prompt: str | None = option(None, "default: the task's official negative prompt")
    image_path: str | None = option(None, "first frame for i2v-A14B / i2v-14B / flf2v-14B / ti2v-5B; the size "
                                    "follows its aspect ratio", aliases=("--image",))
    end_image_path: str | None = option(None, "last frame for flf2v-14B (resized to cover the first frame's size "
                                        "and center-cropped)", aliases=("--end_image",))
    control_path: str | None = option(None, "control video of the Fun-Control tasks (t2v-1.3B-FC / t2v-14B-FC / "
                                      "i2v-14B-FC): a video file or a folder of frames, at least --video_length "
                                      "frames, read from its first frame and fitted to the output size")
    video_size: tuple[int, ...] | None = option(None, "height width in pixels (default: the task's); with an "
                                                "image only the area counts", nargs=2, metavar=("HEIGHT", "WIDTH"))
    size: str | None = option(None, "official spelling WIDTH*HEIGHT, e.g. 832*480 (alias of --video_size)")
    video_length: int | None = option(None, "pixel frames, 4n+1; 1 = an image (default: the task's)",
                                      aliases=("--frame_num",))
    fps: int | None = option(None, "frame rate of the MP4 (default: the task's 16 / 24)")
    infer_steps: int | None = option(None, "denoising steps (default: the task's)", aliases=("--sample_steps",))
    guidance_scale: float | None = option(None, "CFG scale (low-noise expert, or the only model); alone it sets "
                                          "both A14B experts", aliases=("--sample_guide_scale",))
    guidance_scale_high_noise: float | None = option(None, "CFG scale of the high-noise expert (A14B)")
    flow_shift: float | None = option(None, "sampling shift (default: the task's)", aliases=("--sample_shift",))
    sample_solver: str = option("unipc", "solver", choices=("unipc", "euler", "dpm++"))
    seed: int | None = option(None, "noise seed (default or negative: random, as the official --base_seed -1)",
                              aliases=("--base_seed",))
    cpu_noise: bool = option(False, "draw the initial noise on the CPU generator")
    cfg_skip_mode: str = option("none", "skip the unconditional pass on some steps",
                                choices=("none", "early", "late", "middle", "early_late", "alternate"))
    cfg_apply_ratio: float | None = option(None, "fraction of steps that keep CFG with --cfg_skip_mode (default 0.5)")
    cfg_separate: bool = option(False, "run CFG's two passes separately (default: one batch of 2)")
    from_file: str | None = option(None, "prompt file: one prompt per line with inline --w --h --f --d --s --g "
                                   "--fs --i --ei --cn --n")
    interactive: bool = option(False, "read prompts from the terminal until EOF (Ctrl+D)")


@dataclass(frozen=True)
class LoraOptions:
    """The LoRAs applied to the DiT(s) (:mod:`wanlora.lora.apply`)."""

    lora_weight: tuple[str, ...] = option((), "LoRA files (the low-noise / only model; files whose metadata "
                                          "wan.expert names an expert go to that expert)", nargs="+")
    lora_multiplier: tuple[float, ...] = option((), "one per --lora_weight (default 1.0)", nargs="+")
    lora_weight_high_noise: tuple[str, ...] = option((), "LoRA files for the high-noise expert (A14B)", nargs="+")
    lora_multiplier_high_noise: tuple[float, ...] = option((), "one per --lora_weight_high_noise", nargs="+")
    include_patterns: tuple[str, ...] | None = option(None, "regex per LoRA: keep only matching modules", nargs="+")
    exclude_patterns: tuple[str, ...] | None = option(None, "regex per LoRA: drop matching modules", nargs="+")
    lora_dynamic: bool = option(False, "apply LoRAs as hooks instead of merging them")


@dataclass(frozen=True)
class OutputOptions:
    """Where the results go."""

    save_path: str = option("outputs", "output folder")
    output_type: str = option("video", "video (MP4, or PNG for 1 frame), images (PNG frames), latent "
                              "(.safetensors), both (video + latent)", choices=OUTPUT_TYPES)


@dataclass(frozen=True)
class GenerateConfig:
    """The settings of ``wanlora-generate`` (flag names of the official ``generate.py`` and of the Wan
    LoRA tools; aliases ``--size``, ``--frame_num``, ``--sample_steps``, ... included)."""

    model_files: ModelFiles = group(ModelFiles, "models", help={
        "task": "which Wan model (required)",
        "dit": "DiT checkpoint (file, shard index or folder); low-noise expert for A14B (required)",
        "dit_high_noise": "high-noise expert checkpoint (A14B tasks)",
        "vae": "Wan2.1_VAE.pth / Wan2.2_VAE.pth (needed unless --output_type latent without image)",
        "t5": "umT5 encoder checkpoint (models_t5_umt5-xxl-enc-bf16.pth; required)",
        "t5_tokenizer": "umT5 tokenizer folder (default: found beside --t5)",
        "clip": "CLIP image encoder (i2v-14B / flf2v-14B; required there): "
                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors"})
    runtime: RuntimeOptions = group(RuntimeOptions, "runtime")
    compile: CompileOptions = group(CompileOptions, "torch.compile")
    request: RequestOptions = group(RequestOptions, "what to generate")
    lora: LoraOptions = group(LoraOptions, "LoRA")
    output: OutputOptions = group(OutputOptions, "output")
    parallel: ParallelOptions = group(ParallelOptions, "distribution (under torchrun / accelerate launch)")


def command_line() -> CommandLine:
    """The ``wanlora-generate`` command line."""
    return CommandLine(PROG, "Generate videos or images with Wan2.2 / Wan2.1 DiTs (and LoRAs).",
                       GenerateConfig)


def build_parser():
    """The ``wanlora-generate`` argument parser."""
    return command_line().parser


def parse_args(argv=None) -> GenerateConfig:
    """Parse and cross-check the flags; ``--size W*H`` becomes ``video_size = (H, W)``.

    Raises:
        SystemExit: (argparse, status 2) a missing required flag, a malformed ``--size``, not exactly
            one prompt source, a missing or superfluous expert checkpoint for the task, or no
            ``--vae`` where one is needed.
        ConfigFileError: an unusable ``--config_file``.
    """
    cl = command_line()
    return _checked(cl, cl.parse_namespace(argv, required=REQUIRED))


REQUIRED = ("task", "dit", "t5")


def _checked(cl: CommandLine, ns) -> GenerateConfig:
    """The config of a parsed namespace, cross-checked (:func:`parse_args`)."""
    config = config_from_namespace(GenerateConfig, ns)
    r, files = config.request, config.model_files
    if r.size is not None:
        m = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", r.size)
        if not m:
            cl.error(f"--size {r.size!r}: use WIDTH*HEIGHT, e.g. 832*480")
        if r.video_size is not None:
            cl.error("give either --video_size HEIGHT WIDTH or --size WIDTH*HEIGHT, not both")
        config = replace(config, request=replace(r, video_size=(int(m.group(2)), int(m.group(1)))))
    modes = sum(x is not None and x is not False for x in (r.prompt, r.from_file, r.interactive or None))
    if modes != 1:
        cl.error("give exactly one of --prompt, --from_file, --interactive")
    task = get_task(files.task)
    if task.has_experts and not files.dit_high_noise:
        cl.error(f"--task {task.name} has two experts: give --dit (low noise) and --dit_high_noise")
    if not task.has_experts and (files.dit_high_noise or config.lora.lora_weight_high_noise):
        cl.error(f"--task {task.name} is a single model: --dit_high_noise / --lora_weight_high_noise do not apply")
    if config.output.output_type != "latent" and files.vae is None:
        cl.error("--vae is needed to decode (or use --output_type latent)")
    if conditioning_for(task).requires_image and files.vae is None:
        cl.error(f"--task {task.name} encodes the first frame: give --vae")
    if conditioning_for(task).uses_control:
        if files.vae is None:
            cl.error(f"--task {task.name} encodes the control video: give --vae")
        if r.prompt is not None and r.control_path is None:
            cl.error(f"--task {task.name} (Fun-Control) generates from a control video: give --control_path "
                     "(a video file or a folder of frames)")
    elif r.control_path is not None:
        cl.error(f"--control_path is for the Fun-Control tasks (t2v-1.3B-FC, t2v-14B-FC, i2v-14B-FC), "
                 f"not --task {task.name}")
    if conditioning_for(task).uses_clip and files.clip is None:
        cl.error(f"--task {task.name} conditions on CLIP image features: give --clip "
                 "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)")
    if r.interactive and (config.parallel.ulysses_size > 1 or config.parallel.dit_fsdp):
        cl.error("--interactive reads one terminal: it runs in one process, without --ulysses_size / --dit_fsdp")
    return config


# ----------------------------------------------------------------------------------------------


def _device_dtype(runtime: RuntimeOptions):
    device = default_device(runtime.device)
    dtype = runtime.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def request_defaults(config: GenerateConfig) -> GenerationRequest:
    """The request the flags describe, which a prompt's inline options override
    (:func:`wanlora.inference.session.requests_for`): the empty prompt, and seed ``-1`` (drawn at
    random) when ``--seed`` is not given."""
    r = config.request
    h, w = r.video_size or (None, None)
    return GenerationRequest(
        prompt="", negative_prompt=r.negative_prompt, height=h, width=w, frames=r.video_length,
        seed=-1 if r.seed is None else r.seed, steps=r.infer_steps, guidance_scale=r.guidance_scale,
        guidance_scale_high_noise=r.guidance_scale_high_noise, flow_shift=r.flow_shift, solver=r.sample_solver,
        image_path=r.image_path, end_image_path=r.end_image_path, control_path=r.control_path,
        cfg_skip_mode=r.cfg_skip_mode, cfg_apply_ratio=r.cfg_apply_ratio, cfg_batched=not r.cfg_separate)


def main(argv=None) -> int:
    """Parse ``argv``, generate, return the exit status: 0 done, 2 a flag or user error (wrong checkpoint,
    bad prompt line, LoRA that does not fit, missing attention package, ...), printed as one line
    ``wanlora-generate: error: <message>`` (``WANLORA_TRACEBACK=1`` shows the traceback;
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli(PROG, _main, argv)


def _main(argv=None) -> int:
    cl = command_line()
    ns = cl.parse_namespace(argv, required=REQUIRED)
    setup_logging(ns.verbose)
    config = _checked(cl, ns)
    r, rt, lora = config.request, config.runtime, config.lora
    if r.from_file:
        specs = read_prompt_file(r.from_file)  # parse before loading anything
    elif r.prompt is not None:
        specs = [PromptSpec(r.prompt)]
    else:
        specs = []
    defaults = request_defaults(config)
    device, dtype = _device_dtype(rt)
    if rt.estimate_memory:  # before any process group, file check or model load
        first = (requests_for(specs, defaults) or [GenerationRequest("")])[0]
        print(estimate_for_generation(config.model_files.task, first.width, first.height, first.frames, dtype=dtype,
                                      fp8=rt.fp8, blocks_to_swap=rt.blocks_to_swap, cfg_batched=not r.cfg_separate,
                                      offload_inactive=not rt.no_offload).format())
        return 0
    device = init_from_env(device)  # under torchrun / accelerate launch: join the process group
    layout = parallel_layout(config.parallel.ulysses_size, config.parallel.dit_fsdp, device)
    if layout.world_size > 1:
        share_random_seeds(layout)
        logger.info("layout: %s", layout.describe())
    requests = requests_for(specs, defaults)  # reads the images: a bad --i fails before the models load
    preflight_generate(config)  # --save_path, the VAE's kind, the LoRAs' task: before the models load
    # the LoRA files are read (and refused: layout, NaN/Inf weights) before any model loads
    plans = plan_loras(get_task(config.model_files.task), lora.lora_weight, lora.lora_multiplier,
                       lora.lora_weight_high_noise, lora.lora_multiplier_high_noise, lora.include_patterns,
                       lora.exclude_patterns)
    pipe, lora_log = load_pipeline(config.model_files, plans, device=device, dtype=dtype, attn_mode=rt.attn_mode,
                                   fp8=rt.fp8, offload=not rt.no_offload, blocks_to_swap=rt.blocks_to_swap,
                                   lora_dynamic=lora.lora_dynamic, compile=config.compile, layout=layout)
    session = GenerationSession(pipe, config.model_files, lora_log, save_path=config.output.save_path,
                                output_type=config.output.output_type, fps=r.fps, cpu_noise=r.cpu_noise,
                                write=layout.rank == 0)
    if requests:
        session.render_all(requests)
    else:
        print("Enter a prompt (inline --w --h --f --d --s --g --fs --i --n); Ctrl+D to quit.", flush=True)
        session.interactive(sys.stdin, defaults, on_error=lambda e: print_user_error(PROG, e),
                            user_errors=USER_ERRORS)
    if layout.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
