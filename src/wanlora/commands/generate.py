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

import argparse
import json
import logging
import random
import re
import sys
import time
from pathlib import Path

import torch

from wanlora.commands.cli import USER_ERRORS, run_cli
from wanlora.conditioning import conditioning_for
from wanlora.tasks import TASKS, get_task

logger = logging.getLogger("wanlora.commands.generate")

OUTPUT_TYPES = ("video", "images", "latent", "both")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    """The ``wanlora-generate`` argument parser (flag names of the official ``generate.py`` and of the
    Wan LoRA tools; aliases ``--size``, ``--frame_num``, ``--sample_steps``, ... included)."""
    p = argparse.ArgumentParser(
        prog="wanlora-generate",
        description="Generate videos or images with Wan2.2 / Wan2.1 DiTs (and LoRAs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("models")
    m.add_argument("--task", required=True, choices=list(TASKS), help="which Wan model")
    m.add_argument("--dit", required=True, help="DiT checkpoint (file, shard index or folder); low-noise expert for A14B")
    m.add_argument("--dit_high_noise", default=None, help="high-noise expert checkpoint (A14B tasks)")
    m.add_argument("--vae", default=None, help="Wan2.1_VAE.pth / Wan2.2_VAE.pth (needed unless --output_type latent without image)")
    m.add_argument("--t5", required=True, help="umT5 encoder checkpoint (models_t5_umt5-xxl-enc-bf16.pth)")
    m.add_argument("--t5_tokenizer", default=None, help="umT5 tokenizer folder (default: found beside --t5)")
    m.add_argument("--attn_mode", default="sdpa", help="attention kernel: sdpa (PyTorch picks), cudnn, flash (FlashAttention-2), "
                   "flash3 (FlashAttention-3), xformers, sage (SageAttention); torch = sdpa")
    m.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    m.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="DiT/T5 dtype (default bf16 on CUDA, float32 on CPU)")
    m.add_argument("--no_offload", action="store_true",
                   help="keep every model on the device (default on CUDA: the text encoder and the idle expert go to the CPU)")

    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", default=None, help="the prompt (or --from_file / --interactive)")
    g.add_argument("--negative_prompt", default=None, help="default: the task's official negative prompt")
    g.add_argument("--image_path", "--image", dest="image_path", default=None, help="first frame for i2v-A14B / ti2v-5B; the size follows its aspect ratio")
    g.add_argument("--video_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                   help="height width in pixels (default: the task's); with an image only the area counts")
    g.add_argument("--size", default=None, help="official spelling WIDTH*HEIGHT, e.g. 832*480 (alias of --video_size)")
    g.add_argument("--video_length", "--frame_num", dest="video_length", type=int, default=None,
                   help="pixel frames, 4n+1; 1 = an image (default: the task's)")
    g.add_argument("--fps", type=int, default=None, help="frame rate of the MP4 (default: the task's 16 / 24)")
    g.add_argument("--infer_steps", "--sample_steps", dest="infer_steps", type=int, default=None, help="denoising steps")
    g.add_argument("--guidance_scale", "--sample_guide_scale", dest="guidance_scale", type=float, default=None,
                   help="CFG scale (low-noise expert, or the only model); alone it sets both A14B experts")
    g.add_argument("--guidance_scale_high_noise", type=float, default=None, help="CFG scale of the high-noise expert (A14B)")
    g.add_argument("--flow_shift", "--sample_shift", dest="flow_shift", type=float, default=None, help="sampling shift")
    g.add_argument("--sample_solver", default="unipc", choices=["unipc", "euler", "dpm++"], help="solver")
    g.add_argument("--seed", "--base_seed", dest="seed", type=int, default=None, help="noise seed (default or negative: random, as the official --base_seed -1)")
    g.add_argument("--cpu_noise", action="store_true", help="draw the initial noise on the CPU generator")
    g.add_argument("--cfg_skip_mode", default="none", choices=["none", "early", "late", "middle", "early_late", "alternate"],
                   help="skip the unconditional pass on some steps")
    g.add_argument("--cfg_apply_ratio", type=float, default=None, help="fraction of steps that keep CFG with --cfg_skip_mode (default 0.5)")
    g.add_argument("--cfg_separate", action="store_true", help="run CFG's two passes separately (default: one batch of 2)")
    g.add_argument("--from_file", default=None, help="prompt file: one prompt per line with inline --w --h --f --d --s --g --fs --i --n")
    g.add_argument("--interactive", action="store_true", help="read prompts from the terminal until EOF (Ctrl+D)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_weight", nargs="+", default=[], help="LoRA files (the low-noise / only model; "
                    "files whose metadata wan.expert names an expert go to that expert)")
    lo.add_argument("--lora_multiplier", nargs="+", type=float, default=[], help="one per --lora_weight (default 1.0)")
    lo.add_argument("--lora_weight_high_noise", nargs="+", default=[], help="LoRA files for the high-noise expert (A14B)")
    lo.add_argument("--lora_multiplier_high_noise", nargs="+", type=float, default=[], help="one per --lora_weight_high_noise")
    lo.add_argument("--include_patterns", nargs="+", default=None, help="regex per LoRA: keep only matching modules")
    lo.add_argument("--exclude_patterns", nargs="+", default=None, help="regex per LoRA: drop matching modules")
    lo.add_argument("--lora_dynamic", action="store_true", help="apply LoRAs as hooks instead of merging them")

    o = p.add_argument_group("output")
    o.add_argument("--save_path", default="outputs", help="output folder")
    o.add_argument("--output_type", default="video", choices=OUTPUT_TYPES,
                   help="video (MP4, or PNG for 1 frame), images (PNG frames), latent (.safetensors), both (video + latent)")
    o.add_argument("--verbose", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and cross-check the flags; ``--size W*H`` becomes ``video_size = [H, W]``.

    Raises:
        SystemExit: (argparse, status 2) a malformed ``--size``, not exactly one prompt source, a
            missing or superfluous expert checkpoint for the task, or no ``--vae`` where one is needed.
    """
    p = build_parser()
    args = p.parse_args(argv)
    if args.size is not None:
        m = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", args.size)
        if not m:
            p.error(f"--size {args.size!r}: use WIDTH*HEIGHT, e.g. 832*480")
        if args.video_size is not None:
            p.error("give either --video_size HEIGHT WIDTH or --size WIDTH*HEIGHT, not both")
        args.video_size = [int(m.group(2)), int(m.group(1))]
    modes = sum(x is not None and x is not False for x in (args.prompt, args.from_file, args.interactive or None))
    if modes != 1:
        p.error("give exactly one of --prompt, --from_file, --interactive")
    task = get_task(args.task)
    if task.has_experts and not args.dit_high_noise:
        p.error(f"--task {task.name} has two experts: give --dit (low noise) and --dit_high_noise")
    if not task.has_experts and (args.dit_high_noise or args.lora_weight_high_noise):
        p.error(f"--task {task.name} is a single model: --dit_high_noise / --lora_weight_high_noise do not apply")
    if args.output_type != "latent" and args.vae is None:
        p.error("--vae is needed to decode (or use --output_type latent)")
    if conditioning_for(task).requires_image and args.vae is None:
        p.error(f"--task {task.name} encodes the first frame: give --vae")
    return args


# ----------------------------------------------------------------------------------------------


def _device_dtype(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype:
        dtype = _DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_models(args, device, dtype):
    """Load the DiT(s) (``dtype``), the VAE (float32) and the text encoder; apply the LoRAs.

    With offloading (CUDA without ``--no_offload``) the A14B experts and the text encoder start on
    the CPU and visit ``device`` when used.

    Returns:
        ``(WanPipeline, lora_log)``; ``lora_log`` is :func:`wanlora.lora.apply.apply_loras`'s list.
    Raises:
        ValueError / FileNotFoundError: a checkpoint or LoRA that does not load or fit the task.
    """
    from wanlora.lora.apply import apply_loras, plan_loras
    from wanlora.models import load_dit, load_text_encoder, load_vae
    from wanlora.inference.pipeline import WanPipeline

    task = get_task(args.task)
    offload = device.type != "cpu" and not args.no_offload
    home = "cpu" if (offload and task.has_experts) else device
    t0 = time.perf_counter()
    if task.has_experts:
        dits = {"low_noise": load_dit(args.dit, task.name, dtype=dtype, device=home, attn_mode=args.attn_mode),
                "high_noise": load_dit(args.dit_high_noise, task.name, dtype=dtype, device=home, attn_mode=args.attn_mode)}
    else:
        dits = {None: load_dit(args.dit, task.name, dtype=dtype, device=device, attn_mode=args.attn_mode)}
    for d in dits.values():
        d.eval().requires_grad_(False)
    vae = load_vae(args.vae, dtype=torch.float32, device=device) if args.vae else None
    te = load_text_encoder(args.t5, args.t5_tokenizer, dtype=dtype, device="cpu" if offload else device)
    logger.info("models loaded in %.1f s", time.perf_counter() - t0)
    plan = plan_loras(task, args.lora_weight, args.lora_multiplier, args.lora_weight_high_noise,
                      args.lora_multiplier_high_noise, args.include_patterns, args.exclude_patterns)
    pipe = WanPipeline(task, dits, vae=vae, text_encoder=te, device=device, offload=offload, progress=True)
    lora_log = apply_loras(pipe, plan, dynamic=args.lora_dynamic)
    return pipe, lora_log


def _requests(args, specs):
    """One :class:`GenerationRequest` per prompt spec; a spec's inline options win over the flags.
    A missing or negative seed is drawn at random here (the official ``seed >= 0 else random``).
    Raises MediaError (a ValueError) for an unreadable image."""
    from wanlora.inference.pipeline import GenerationRequest
    from wanlora.video_io import read_image

    h, w = args.video_size if args.video_size else (None, None)
    out = []
    for spec in specs:
        image_path = spec.image_path or args.image_path
        seed = spec.seed if spec.seed is not None else args.seed
        if seed is None or seed < 0:
            seed = random.randint(0, 2**31 - 1)
        out.append(GenerationRequest(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else args.negative_prompt,
            height=spec.height or h, width=spec.width or w,
            frames=spec.frames or args.video_length,
            seed=seed,
            steps=spec.steps or args.infer_steps,
            guidance_scale=spec.guidance_scale if spec.guidance_scale is not None else args.guidance_scale,
            guidance_scale_high_noise=args.guidance_scale_high_noise,
            flow_shift=spec.flow_shift if spec.flow_shift is not None else args.flow_shift,
            solver=args.sample_solver,
            image=read_image(image_path) if image_path else None,
            image_path=str(image_path) if image_path else None,
            cfg_skip_mode=args.cfg_skip_mode, cfg_apply_ratio=args.cfg_apply_ratio,
            cfg_batched=not args.cfg_separate,
        ))
    return out


def save_outputs(save_dir, stem: str, latent, video, request, task, output_type: str, fps: int,
                 extra: dict | None = None) -> list[Path]:
    """Write the outputs of one generation; returns the written paths.

    ``video`` (MP4 H.264, or a PNG for a single frame), ``images`` (a folder of PNG frames),
    ``latent`` (``.safetensors`` with ``latent`` ``[C, T, h, w]``), ``both`` (video + latent), and
    always a sidecar ``.json`` with the prompt, seed and settings (also put in the MP4's metadata).
    """
    from wanlora.io_utils import save_safetensors, write_json
    from wanlora.video_io import write_images, write_video

    save_dir = Path(save_dir)
    settings = {**request.settings(), "task": task.name, "fps": fps, **(extra or {})}
    meta = {"prompt": request.prompt, "negative_prompt": request.negative_prompt or "",
            "seed": str(request.seed), "comment": json.dumps(settings, ensure_ascii=False)}
    written = []
    if output_type in ("video", "both"):
        if video.shape[1] == 1:
            written += _rename(write_images(save_dir, video, prefix=stem), save_dir / f"{stem}.png")
        else:
            written.append(write_video(save_dir / f"{stem}.mp4", video, fps, metadata=meta))
    if output_type == "images":
        written += write_images(save_dir / stem, video, prefix="frame")
    if output_type in ("latent", "both"):
        p = save_dir / f"{stem}.safetensors"
        save_safetensors({"latent": latent.float().cpu()}, p,
                         metadata={k: str(v) for k, v in meta.items()})
        written.append(p)
    settings["files"] = [str(x) for x in written]
    write_json(save_dir / f"{stem}.json", settings)
    return written


def _rename(paths, target: Path) -> list[Path]:
    paths[0].replace(target)
    return [target]


def run_one(pipe, request, args, index: int | None, lora_log, context=None, context_null=None) -> list[Path]:
    """Generate one request and write its files (:func:`save_outputs`); returns their paths.

    ``context``/``context_null``: precomputed embeddings (``[[L, d]]``), else the pipeline's text
    encoder runs. ``index`` numbers the file stem in a batch (``None`` for a single prompt).

    Raises:
        ValueError: a request the task rejects (size, frame count, missing image).
    """
    task = pipe.task
    t0 = time.perf_counter()
    latent, video, resolved = pipe.generate(request, context, context_null, cpu_noise=args.cpu_noise,
                                            decode=args.output_type != "latent")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}_{resolved.seed}" if index is None else f"{stamp}_{index:03d}_{resolved.seed}"
    fps = args.fps or task.fps
    paths = save_outputs(args.save_path, stem, latent, video, resolved, task, args.output_type, fps,
                         extra={"loras": lora_log, "cpu_noise": args.cpu_noise, "dit": args.dit,
                                "dit_high_noise": args.dit_high_noise})
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
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from wanlora.inference.prompts import PromptSpec, read_prompt_file

    if args.from_file:
        specs = read_prompt_file(args.from_file)  # parse before loading anything
    elif args.prompt is not None:
        specs = [PromptSpec(args.prompt)]
    else:
        specs = []
    requests = _requests(args, specs)  # reads the images: a bad --i fails before the models load
    device, dtype = _device_dtype(args)
    pipe, lora_log = load_models(args, device, dtype)
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
                written += run_one(pipe, req, args, i if n > 1 else None, lora_log, [embs[i]], [embs[n + i]])
        else:
            written += _interactive(pipe, args, lora_log)
    return 0


def _interactive(pipe, args, lora_log) -> list[Path]:
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
            written += run_one(pipe, _requests(args, [spec])[0], args, k, lora_log)
        except USER_ERRORS as e:
            print(f"wanlora-generate: error: {e}", file=sys.stderr, flush=True)
            logger.debug("the line's traceback", exc_info=True)  # shown with --verbose
            continue
        k += 1
    return written


if __name__ == "__main__":
    sys.exit(main())
