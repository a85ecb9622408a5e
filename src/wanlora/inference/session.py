"""A generation session: the models loaded once, then requests rendered to files.

What ``wanlora-generate`` (:mod:`wanlora.commands.generate`) does between parsing its flags and
exiting: :func:`load_pipeline` loads the DiT(s), VAE, umT5 and CLIP and applies the LoRAs;
:func:`requests_for` turns prompt specs (``--prompt``, ``--from_file``, ``--interactive`` lines,
:mod:`wanlora.inference.prompts`) into :class:`~wanlora.inference.pipeline.GenerationRequest`\\ s;
:class:`GenerationSession` renders them with the :class:`~wanlora.inference.pipeline.WanPipeline`
and writes each one's files (:func:`wanlora.inference.outputs.save_outputs`). The numerics live in
the pipeline; this module only places models and moves requests through it. The official
counterpart is ``generate.py: generate`` of Wan2.2 (models built once, one video per call).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence

import torch

from wanlora.conditioning import conditioning_for
from wanlora.inference.outputs import save_outputs
from wanlora.inference.pipeline import GenerationRequest, WanPipeline
from wanlora.inference.prompts import PromptSpec, parse_prompt_line
from wanlora.run_config import CompileOptions, ModelFiles
from wanlora.tasks import get_task

__all__ = ["load_pipeline", "requests_for", "share_random_seeds", "GenerationSession"]

logger = logging.getLogger(__name__)


def load_pipeline(files: ModelFiles, loras: Sequence = (), *, device: torch.device, dtype: torch.dtype,
                  attn_mode: str = "sdpa", fp8: str | None = None, offload: bool = True, blocks_to_swap: int = 0,
                  lora_dynamic: bool = False, compile: CompileOptions | None = None,
                  layout=None) -> tuple[WanPipeline, list[dict]]:
    """Load the DiT(s) in ``dtype``, the VAE (float32), umT5 and CLIP; apply the LoRAs.

    Args:
        files: the checkpoints (``files.task`` names the model; ``dit_high_noise`` for A14B; ``vae``
            may be None when nothing is decoded or encoded; ``clip`` is loaded for the tasks whose
            conditioning uses CLIP features, in float16 on a GPU and float32 elsewhere, the official
            ``clip_dtype``).
        loras: :class:`wanlora.lora.apply.LoraPlan`\\ s from :func:`~wanlora.lora.apply.plan_loras`
            (read, and refused, before any model loads); merged, or hooked with ``lora_dynamic``
            (and always hooked on fp8 weights), by :func:`~wanlora.lora.apply.apply_loras`.
        device: where the denoising runs. dtype: the DiTs' and umT5's compute dtype.
        attn_mode: the attention kernel (:mod:`wanlora.models.attention`).
        fp8: ``None``, ``"base"`` or ``"scaled"`` (:func:`wanlora.models.load_dit`).
        offload: on a non-CPU ``device`` and without FSDP, the A14B experts and the text encoder
            (and CLIP) start on the CPU and visit ``device`` when used (the pipeline's ``offload``).
        blocks_to_swap: DiT blocks kept in pinned host memory and copied ahead of use
            (:class:`wanlora.models.block_swap.BlockSwap`); both experts share one set of device slots.
        compile: regional ``torch.compile`` of every DiT after the LoRAs (None or ``compile=False``:
            none).
        layout: a :class:`wanlora.models.distributed.ParallelLayout`: with more than one process each
            DiT, LoRAs applied, is put on its sequence group and FSDP2 shards. Only rank 0 shows
            the progress bar.

    Returns:
        ``(pipeline, lora_log)``; ``lora_log`` is :func:`~wanlora.lora.apply.apply_loras`'s JSON-able
        list (path, multiplier, expert, module count, merged or dynamic) for the sidecar files.
    Raises:
        ValueError: ``blocks_to_swap`` with FSDP; a checkpoint that does not fit the task; a LoRA
            whose modules the DiT lacks.
        FileNotFoundError: a missing checkpoint.
    """
    from wanlora.lora.apply import apply_loras
    from wanlora.models import load_dit, load_text_encoder, load_vae
    from wanlora.models.block_swap import BlockSwap

    task = get_task(files.task)
    fsdp = layout is not None and layout.fsdp
    if blocks_to_swap and fsdp:
        raise ValueError("--blocks_to_swap and --dit_fsdp do not combine: FSDP already shards the DiT; drop one")
    offload = offload and device.type != "cpu" and not fsdp
    home = "cpu" if ((offload and task.has_experts) or blocks_to_swap or fsdp) else device
    t0 = time.perf_counter()
    # A14B: one DiT per expert; a single model under None, the expert expert_for_timestep names
    # (and plan_loras gives) when the task has no boundary
    paths = {"low_noise": files.dit, "high_noise": files.dit_high_noise} if task.has_experts else {None: files.dit}
    dits, swaps = {}, []
    for key, path in paths.items():
        dit = load_dit(path, task.name, dtype=dtype, device=home, attn_mode=attn_mode, fp8=fp8)
        if blocks_to_swap:  # the swapped blocks stay on the host; the experts share one set of device slots
            swaps.append(BlockSwap(dit.blocks, blocks_to_swap, device, share_slots_with=swaps[0] if swaps else None))
            if not (offload and task.has_experts):
                dit.to(device)  # the rest (the swapped blocks stay with the swap)
        dits[key] = dit.eval().requires_grad_(False)
    vae = load_vae(files.vae, dtype=torch.float32, device=device) if files.vae else None
    te = load_text_encoder(files.t5, files.t5_tokenizer, dtype=dtype, device="cpu" if offload else device)
    logger.info("models loaded in %.1f s", time.perf_counter() - t0)
    clip = None
    if files.clip and conditioning_for(task).uses_clip:  # the official clip_dtype: fp16 on a GPU
        from wanlora.models import load_clip

        clip = load_clip(files.clip, dtype=torch.float16 if device.type == "cuda" else torch.float32,
                         device="cpu" if offload else device)
    pipe = WanPipeline(task, dits, vae=vae, text_encoder=te, device=device,
                       offload=offload, progress=layout is None or layout.rank == 0, clip=clip)
    lora_log = apply_loras(pipe, list(loras), dynamic=lora_dynamic)
    if layout is not None and layout.world_size > 1:
        from wanlora.models.distributed import distribute_dit

        for d in pipe.dits.values():
            distribute_dit(d, layout)
    if compile is not None and compile.compile:  # after the LoRAs (merged, or hooked with --lora_dynamic)
        for d in pipe.dits.values():
            d.compile_blocks(**compile.kwargs())
    return pipe, lora_log


def requests_for(specs: Iterable[PromptSpec], defaults: GenerationRequest) -> list[GenerationRequest]:
    """One request per prompt spec: the spec's inline options win over ``defaults`` (the flags).

    Per spec: width, height, frames and steps from the spec when set and nonzero; seed, guidance
    scale, flow shift and negative prompt when not None; image, last image and control video paths
    when non-empty; everything else (``guidance_scale_high_noise``, solver, CFG skipping and
    batching) from ``defaults``. A negative seed (the official ``--base_seed -1``) is drawn here from
    Python's :mod:`random`, ``[0, 2**31 - 1]`` (see :func:`share_random_seeds` for several
    processes). The images are read here (PIL RGB), so a bad path fails before any model loads.

    Raises:
        wanlora.video_io.MediaError (a ValueError): an image that cannot be read, a control video
            that does not exist.
    """
    from wanlora.video_io import MediaError, read_image

    out = []
    for spec in specs:
        image_path = spec.image_path or defaults.image_path
        end_image_path = spec.end_image_path or defaults.end_image_path
        control_path = spec.control_path or defaults.control_path
        if control_path and not Path(control_path).exists():
            raise MediaError(f"{control_path}: control video not found (--control_path / --cn)")
        seed = spec.seed if spec.seed is not None else defaults.seed
        if seed < 0:
            seed = random.randint(0, 2**31 - 1)
        out.append(replace(
            defaults,
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else defaults.negative_prompt,
            height=spec.height or defaults.height, width=spec.width or defaults.width,
            frames=spec.frames or defaults.frames,
            seed=seed,
            steps=spec.steps or defaults.steps,
            guidance_scale=spec.guidance_scale if spec.guidance_scale is not None else defaults.guidance_scale,
            flow_shift=spec.flow_shift if spec.flow_shift is not None else defaults.flow_shift,
            image=read_image(image_path) if image_path else None,
            image_path=str(image_path) if image_path else None,
            end_image=read_image(end_image_path) if end_image_path else None,
            end_image_path=str(end_image_path) if end_image_path else None,
            control_path=str(control_path) if control_path else None,
        ))
    return out


def share_random_seeds(layout) -> None:
    """Seed Python's :mod:`random` with one number drawn on rank 0 and broadcast, so that every
    rank of ``layout`` (a :class:`wanlora.models.distributed.ParallelLayout` with an initialized
    process group) draws the same random seeds in :func:`requests_for` for the same requests: under
    ``--ulysses_size`` / ``--dit_fsdp`` all ranks must denoise the same noise."""
    import torch.distributed as dist

    box = [random.randint(0, 2**62) if layout.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    random.seed(box[0])


@dataclass
class GenerationSession:
    """A loaded pipeline and where its results go.

    Attributes:
        pipe: the :class:`WanPipeline` (:func:`load_pipeline`).
        files: the checkpoints it was loaded from (recorded in each sidecar, with
            ``files.metadata()``).
        loras: :func:`load_pipeline`'s LoRA log (recorded in each sidecar).
        save_path: the output folder. output_type: ``video``, ``images``, ``latent`` or ``both``
            (:data:`wanlora.inference.outputs.OUTPUT_TYPES`). fps: the MP4's frame rate (None: the
            task's 16 / 24).
        cpu_noise: draw the initial noise on the CPU generator.
        write: decode and write files (False on the other ranks of a multi-process run: they only
            take part in the denoising).
    """

    pipe: WanPipeline
    files: ModelFiles
    loras: list = field(default_factory=list)
    save_path: str | Path = "outputs"
    output_type: str = "video"
    fps: int | None = None
    cpu_noise: bool = False
    write: bool = True

    def render(self, request: GenerationRequest, index: int | None = None, context=None,
               context_null=None) -> list[Path]:
        """Generate one request and write its files; returns their paths (none when not ``write``).

        Files are named ``{YYYYmmdd-HHMMSS}_{seed}`` (``{stamp}_{index:03d}_{seed}`` when ``index``
        numbers it in a batch) with the extensions :func:`~wanlora.inference.outputs.save_outputs`
        gives them. ``context`` / ``context_null``: precomputed umT5 embeddings, each a list of one
        ``[L, d]`` tensor; else the pipeline's text encoder runs.

        Raises:
            ValueError: a request the task rejects (size, frame count, missing image or control video).
        """
        task = self.pipe.task
        t0 = time.perf_counter()
        latent, video, resolved = self.pipe.generate(request, context, context_null, cpu_noise=self.cpu_noise,
                                                     decode=self.write and self.output_type != "latent")
        if not self.write:
            return []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        stem = f"{stamp}_{resolved.seed}" if index is None else f"{stamp}_{index:03d}_{resolved.seed}"
        files = self.files
        paths = save_outputs(self.save_path, stem, latent, video, resolved, task, self.output_type,
                             self.fps or task.fps,
                             extra={"loras": self.loras, "cpu_noise": self.cpu_noise, "dit": files.dit,
                                    "dit_high_noise": files.dit_high_noise, **files.metadata()})
        logger.info("%s: %dx%d, %d frames, seed %d, %.1f s -> %s", task.name, resolved.width, resolved.height,
                    resolved.frames, resolved.seed, time.perf_counter() - t0, ", ".join(map(str, paths)))
        return paths

    @torch.no_grad()
    def render_all(self, requests: Sequence[GenerationRequest]) -> list[Path]:
        """Render a batch: every prompt and negative prompt is encoded once, then the text encoder is
        freed (``pipe.text_encoder = None``) before the first denoising. Files are numbered by
        position when there is more than one request. Returns every written path.

        Raises:
            ValueError: a request the task rejects (the earlier ones' files stay written).
        """
        pipe = self.pipe
        resolved = [pipe.resolve(r) for r in requests]
        embs = pipe.encode_text([r.prompt for r in resolved] + [r.negative_prompt for r in resolved])
        n = len(resolved)
        pipe.text_encoder = None
        if pipe.device.type == "cuda":
            torch.cuda.empty_cache()
        written = []
        for i, req in enumerate(requests):
            written += self.render(req, i if n > 1 else None, [embs[i]], [embs[n + i]])
        return written

    @torch.no_grad()
    def interactive(self, lines: Iterable[str], defaults: GenerationRequest,
                    on_error: Callable[[BaseException], None],
                    user_errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError)
                    ) -> list[Path]:
        """Render each prompt line (inline options as in a prompt file, :func:`parse_prompt_line`;
        empty and ``#`` lines skipped) until ``lines`` ends (``sys.stdin``: EOF, Ctrl+D); each line
        is a :func:`requests_for` spec over ``defaults``. Returns every written path.

        A ``user_errors`` exception on a line (a bad inline option, an image that cannot be read, a
        size or frame count the task rejects, ...) goes to ``on_error`` (its traceback to this
        module's DEBUG log) and the session goes on with the next line; files are numbered by the
        lines that rendered. Other exceptions (a bug, out of memory) end the session.
        """
        written, k = [], 0
        for line in lines:
            try:
                spec = parse_prompt_line(line, 0, "<interactive>")
                if spec is None:
                    continue
                written += self.render(requests_for([spec], defaults)[0], k)
            except user_errors as e:
                on_error(e)
                logger.debug("the line's traceback", exc_info=True)  # shown with --verbose
                continue
            k += 1
        return written
