"""``wanlora-generate``: text-to-video, image-to-video and text-to-image with Wan DiTs and LoRAs.

Examples::

    wanlora-generate --task t2v-A14B --dit low_noise_model/ --dit_high_noise high_noise_model/ \\
        --vae Wan2.1_VAE.pth --t5 models_t5_umt5-xxl-enc-bf16.pth --prompt "a cat on a skateboard" \\
        --video_size 480 832 --video_length 81 --seed 42 --save_path outputs/
    wanlora-generate --task i2v-A14B ... --image_path cat.jpg       # size from the image's aspect
    wanlora-generate --task ti2v-5B ... --video_length 1              # text-to-image (PNG)
    wanlora-generate ... --from_file prompts.txt                      # batch, models loaded once
    wanlora-generate ... --lora_weight my_low.safetensors --lora_weight_high_noise my_high.safetensors

The script parses arguments and wires library calls (:mod:`wanlora.inference.pipeline`, :mod:`wanlora.inference.prompts`,
:mod:`wanlora.lora.apply`); the numerics live there. See ``docs/generation.md``.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import USER_ERRORS, run_cli
from wanlora.commands.preflight import preflight_generate
from wanlora.conditioning import conditioning_for
from wanlora.inference.outputs import OUTPUT_TYPES, save_outputs
from wanlora.run_config import (CompileOptions, ModelFiles, ParallelOptions, attn_option, default_device, device_option,
                                dtype_option, group, option)
from wanlora.tasks import get_task

__all__ = ["GenerateConfig", "build_parser", "parse_args", "load_models", "run_one", "main"]

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
    return CommandLine("wanlora-generate", "Generate videos or images with Wan2.2 / Wan2.1 DiTs (and LoRAs).",
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


def load_models(config: GenerateConfig, device, dtype, layout=None):
    """Load the DiT(s) (``dtype``), the VAE (float32) and the text encoder; apply the LoRAs.

    With offloading (CUDA without ``--no_offload``, and without ``--dit_fsdp``) the A14B experts and
    the text encoder start on the CPU and visit ``device`` when used. ``layout``
    (:class:`wanlora.models.distributed.ParallelLayout`) puts each DiT, LoRAs applied, on its
    sequence group and FSDP2 shards.

    Returns:
        ``(WanPipeline, lora_log)``; ``lora_log`` is :func:`wanlora.lora.apply.apply_loras`'s list.
    Raises:
        ValueError / FileNotFoundError: a checkpoint or LoRA that does not load or fit the task.
    """
    from wanlora.lora.apply import apply_loras, plan_loras
    from wanlora.models import load_dit, load_text_encoder, load_vae
    from wanlora.inference.pipeline import WanPipeline

    from wanlora.models.block_swap import BlockSwap

    task = get_task(config.model_files.task)
    # the LoRA files are read (and refused: layout, NaN/Inf weights) before any model loads
    plan = plan_loras(task, config.lora.lora_weight, config.lora.lora_multiplier, config.lora.lora_weight_high_noise,
                      config.lora.lora_multiplier_high_noise, config.lora.include_patterns, config.lora.exclude_patterns)
    rt = config.runtime
    fsdp = layout is not None and layout.fsdp
    if rt.blocks_to_swap and fsdp:
        raise ValueError("--blocks_to_swap and --dit_fsdp do not combine: FSDP already shards the DiT; drop one")
    offload = device.type != "cpu" and not rt.no_offload and not fsdp
    swap_n = rt.blocks_to_swap
    home = "cpu" if ((offload and task.has_experts) or swap_n or fsdp) else device
    t0 = time.perf_counter()
    paths = ({"low_noise": config.model_files.dit, "high_noise": config.model_files.dit_high_noise}
             if task.has_experts else {None: config.model_files.dit})
    dits, swaps = {}, []
    for key, path in paths.items():
        dit = load_dit(path, task.name, dtype=dtype, device=home, attn_mode=rt.attn_mode, fp8=rt.fp8)
        if swap_n:  # the swapped blocks stay on the host; the experts share one set of device slots
            swaps.append(BlockSwap(dit.blocks, swap_n, device, share_slots_with=swaps[0] if swaps else None))
            if not (offload and task.has_experts):
                dit.to(device)  # the rest (the swapped blocks stay with the swap)
        dits[key] = dit.eval().requires_grad_(False)
    vae = load_vae(config.model_files.vae, dtype=torch.float32, device=device) if config.model_files.vae else None
    te = load_text_encoder(config.model_files.t5, config.model_files.t5_tokenizer, dtype=dtype, device="cpu" if offload else device)
    logger.info("models loaded in %.1f s", time.perf_counter() - t0)
    main_rank = layout is None or layout.rank == 0
    clip = None
    if config.model_files.clip and conditioning_for(task).uses_clip:  # the official clip_dtype: fp16 on a GPU
        from wanlora.models import load_clip

        clip = load_clip(config.model_files.clip, dtype=torch.float16 if device.type == "cuda" else torch.float32,
                         device="cpu" if offload else device)
    pipe = WanPipeline(task, dits, vae=vae, text_encoder=te, device=device, offload=offload, progress=main_rank,
                       clip=clip)
    lora_log = apply_loras(pipe, plan, dynamic=config.lora.lora_dynamic)
    if layout is not None and layout.world_size > 1:
        from wanlora.models.distributed import distribute_dit

        for d in dits.values():
            distribute_dit(d, layout)
    if config.compile.compile:  # after the LoRAs (merged, or hooked with --lora_dynamic)
        for d in dits.values():
            d.compile_blocks(**config.compile.kwargs())
    return pipe, lora_log


def _requests(config: GenerateConfig, specs):
    """One :class:`GenerationRequest` per prompt spec; a spec's inline options win over the flags.
    A missing or negative seed is drawn at random here (the official ``seed >= 0 else random``).
    Raises MediaError (a ValueError) for an unreadable image."""
    from wanlora.inference.pipeline import GenerationRequest
    from wanlora.video_io import MediaError, read_image

    h, w = config.request.video_size or (None, None)
    out = []
    for spec in specs:
        image_path = spec.image_path or config.request.image_path
        end_image_path = spec.end_image_path or config.request.end_image_path
        control_path = spec.control_path or config.request.control_path
        if control_path and not Path(control_path).exists():
            raise MediaError(f"{control_path}: control video not found (--control_path / --cn)")
        seed = spec.seed if spec.seed is not None else config.request.seed
        if seed is None or seed < 0:
            seed = random.randint(0, 2**31 - 1)
        out.append(GenerationRequest(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else config.request.negative_prompt,
            height=spec.height or h, width=spec.width or w,
            frames=spec.frames or config.request.video_length,
            seed=seed,
            steps=spec.steps or config.request.infer_steps,
            guidance_scale=spec.guidance_scale if spec.guidance_scale is not None else config.request.guidance_scale,
            guidance_scale_high_noise=config.request.guidance_scale_high_noise,
            flow_shift=spec.flow_shift if spec.flow_shift is not None else config.request.flow_shift,
            solver=config.request.sample_solver,
            image=read_image(image_path) if image_path else None,
            image_path=str(image_path) if image_path else None,
            end_image=read_image(end_image_path) if end_image_path else None,
            end_image_path=str(end_image_path) if end_image_path else None,
            control_path=str(control_path) if control_path else None,
            cfg_skip_mode=config.request.cfg_skip_mode, cfg_apply_ratio=config.request.cfg_apply_ratio,
            cfg_batched=not config.request.cfg_separate,
        ))
    return out


def run_one(pipe, request, config: GenerateConfig, index: int | None, lora_log, context=None, context_null=None,
            write: bool = True) -> list[Path]:
    """Generate one request and write its files (:func:`save_outputs`); returns their paths.

    ``context``/``context_null``: precomputed embeddings (``[[L, d]]``), else the pipeline's text
    encoder runs. ``index`` numbers the file stem in a batch (``None`` for a single prompt).
    ``write=False`` (the other ranks of a multi-process run): denoise only, no decode, no files.

    Raises:
        ValueError: a request the task rejects (size, frame count, missing image).
    """
    task = pipe.task
    t0 = time.perf_counter()
    latent, video, resolved = pipe.generate(request, context, context_null, cpu_noise=config.request.cpu_noise,
                                            decode=write and config.output.output_type != "latent")
    if not write:
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}_{resolved.seed}" if index is None else f"{stamp}_{index:03d}_{resolved.seed}"
    fps = config.request.fps or task.fps
    paths = save_outputs(config.output.save_path, stem, latent, video, resolved, task, config.output.output_type, fps,
                         extra={"loras": lora_log, "cpu_noise": config.request.cpu_noise, "dit": config.model_files.dit,
                                "dit_high_noise": config.model_files.dit_high_noise,
                                **config.model_files.metadata()})
    logger.info("%s: %dx%d, %d frames, seed %d, %.1f s -> %s", task.name, resolved.width, resolved.height,
                resolved.frames, resolved.seed, time.perf_counter() - t0, ", ".join(map(str, paths)))
    return paths


def main(argv=None) -> int:
    """Parse ``argv``, generate, return the exit status: 0 done, 2 a flag or user error (wrong checkpoint,
    bad prompt line, LoRA that does not fit, missing attention package, ...), printed as one line
    ``wanlora-generate: error: <message>`` (``WANLORA_TRACEBACK=1`` shows the traceback;
    :func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-generate", _main, argv)


def _main(argv=None) -> int:
    cl = command_line()
    ns = cl.parse_namespace(argv, required=REQUIRED)
    setup_logging(ns.verbose)
    config = _checked(cl, ns)
    from wanlora.inference.prompts import PromptSpec, read_prompt_file

    if config.request.from_file:
        specs = read_prompt_file(config.request.from_file)  # parse before loading anything
    elif config.request.prompt is not None:
        specs = [PromptSpec(config.request.prompt)]
    else:
        specs = []
    from wanlora.models.distributed import init_from_env, parallel_layout

    device, dtype = _device_dtype(config.runtime)
    if config.runtime.estimate_memory:  # before any process group, file check or model load
        print(_estimate(config, _requests(config, specs), dtype).format())
        return 0
    device = init_from_env(device)  # under torchrun / accelerate launch: join the process group
    layout = parallel_layout(config.parallel.ulysses_size, config.parallel.dit_fsdp, device)
    if layout.world_size > 1:
        _same_random_draws(layout)
        logger.info("layout: %s", layout.describe())
    requests = _requests(config, specs)  # reads the images: a bad --i fails before the models load
    preflight_generate(config)  # --save_path, the VAE's kind, the LoRAs' task: before the models load
    pipe, lora_log = load_models(config, device, dtype, layout)
    write = layout.rank == 0
    written = []
    with torch.no_grad():
        if requests:
            resolved = [pipe.resolve(r) for r in requests]
            # encode every prompt once, then free the text encoder
            embs = pipe.encode_text([r.prompt for r in resolved] + [r.negative_prompt for r in resolved])
            n = len(resolved)
            pipe.text_encoder = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for i, req in enumerate(requests):
                written += run_one(pipe, req, config, i if n > 1 else None, lora_log, [embs[i]], [embs[n + i]],
                                   write=write)
        else:
            written += _interactive(pipe, config, lora_log)
    if layout.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _same_random_draws(layout) -> None:
    """Seed Python's ``random`` with one number drawn on rank 0 and broadcast, so that every rank
    draws the same random seeds (``--seed`` missing or negative) for the same requests: under
    ``--ulysses_size`` / ``--dit_fsdp`` all ranks must denoise the same noise."""
    import torch.distributed as dist

    box = [random.randint(0, 2**62) if layout.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    random.seed(box[0])


def _estimate(config: GenerateConfig, requests, dtype):
    """The memory estimate of the first request's size (the task's defaults when none is given):
    guidance batched (2) unless ``--cfg_separate``, both experts with the inactive one on the host
    unless ``--no_offload``."""
    from wanlora.training.memory import MemorySettings, estimate_memory

    task = get_task(config.model_files.task)
    req = requests[0] if requests else None
    unit = task.pixel_unit
    width = (req and req.width or task.size[0]) // unit * unit  # rounded down as the pipeline does
    height = (req and req.height or task.size[1]) // unit * unit
    frames = req and req.frames or task.frame_num
    rt = config.runtime
    return estimate_memory(MemorySettings(
        task.name, width, height, frames, batch=1 if config.request.cfg_separate else 2, training=False,
        dtype=dtype if dtype != torch.float32 else torch.bfloat16, fp8=rt.fp8, blocks_to_swap=rt.blocks_to_swap,
        experts=2 if task.has_experts else 1, offload_inactive=not rt.no_offload))


def _interactive(pipe, config: GenerateConfig, lora_log) -> list[Path]:
    """``--interactive``: generate each prompt line read from stdin until EOF; returns the files.

    A user error on a line (:data:`wanlora.commands.cli.USER_ERRORS`: a bad inline option, an image that
    cannot be read, a size or frame count the task rejects, ...) is printed as one line
    ``wanlora-generate: error: <message>`` on stderr (``--verbose`` adds its traceback) and the
    session goes on with the next line. Other exceptions (a bug, out of memory) end the session.
    """
    from wanlora.inference.prompts import parse_prompt_line

    print("Enter a prompt (inline --w --h --f --d --s --g --fs --i --n); Ctrl+D to quit.", flush=True)
    written, k = [], 0
    for line in sys.stdin:
        try:
            spec = parse_prompt_line(line, 0, "<interactive>")
            if spec is None:
                continue
            written += run_one(pipe, _requests(config, [spec])[0], config, k, lora_log)
        except USER_ERRORS as e:
            print(f"wanlora-generate: error: {e}", file=sys.stderr, flush=True)
            logger.debug("the line's traceback", exc_info=True)  # shown with --verbose
            continue
        k += 1
    return written


if __name__ == "__main__":
    sys.exit(main())
