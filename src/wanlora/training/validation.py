"""Validation samples: the videos the trainer makes during training (``--sample_prompts``), through
the generation pipeline. ("Validation" as diffusers' training scripts call training-time sampling.)

The trainer calls a :class:`SampleHook` (``--sample_prompts``, ``--sample_every_n_steps``,
``--sample_every_n_epochs``, ``--sample_at_first``), which wraps a :class:`ValidationSampler`::

    sampler = ValidationSampler(task, "prompts.txt", vae_path="Wan2.1_VAE.pth", t5_path="umt5.pth",
                                output_dir="output", output_name="mylora", device="cuda")
    ...
    samples = sampler.sample(global_step, {"high_noise": dit_h, "low_noise": dit_l}, epoch=epoch,
                             networks=[network])
    log_samples(writer, samples, global_step)   # TensorBoard: animated GIFs, no moviepy needed

The prompts are encoded once, at construction, and the text encoder is freed. Sampling draws its
noise from its own ``torch.Generator`` and runs inside :func:`preserve_rng_state`
(``torch.random.fork_rng`` for torch CPU and CUDA, plus Python's and NumPy's states), so taking
samples does not change the training's random stream.
The models are put in eval mode for the samples and given back in the mode they had.
"""

from __future__ import annotations

import gc
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from wanlora.conditioning import conditioning_for
from wanlora.inference.pipeline import GenerationRequest, WanPipeline, module_device
from wanlora.inference.prompts import PromptSpec, read_prompt_file
from wanlora.run_config import default_device
from wanlora.tasks import get_task

__all__ = ["ValidationSampler", "SampleHook", "ValidationSample", "preserve_rng_state", "encode_gif", "log_samples"]

logger = logging.getLogger(__name__)


@contextmanager
def preserve_rng_state():
    """Restore every global random state on exit: torch CPU and the initialized CUDA devices
    (``torch.random.fork_rng``), Python's ``random`` and NumPy's legacy global generator (which
    ``fork_rng`` does not cover)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@dataclass
class ValidationSample:
    """One sample video.

    Attributes:
        index: prompt index in the file; prompt; seed; path (the MP4 written);
        frames: uint8 ``[F, H, W, 3]`` (NumPy); fps.
    """

    index: int
    prompt: str
    seed: int
    path: Path
    frames: np.ndarray
    fps: int

    def video_tensor(self) -> torch.Tensor:
        """``[1, F, 3, H, W]`` uint8, the layout of ``SummaryWriter.add_video``."""
        return torch.from_numpy(self.frames).permute(0, 3, 1, 2)[None]


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    """An animated GIF (looping) of uint8 ``[F, H, W, 3]`` RGB frames shown at ``fps`` frames per
    second, encoded by Pillow (each frame quantized to its own 256-colour palette, as TensorBoard's
    own ``add_video`` GIFs are)."""
    import io

    from PIL import Image

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / max(fps, 1))), loop=0)
    return buf.getvalue()


def log_samples(writer, samples: Sequence[ValidationSample], step: int) -> None:
    """Write samples to a TensorBoard ``SummaryWriter`` with what wanlora depends on (no moviepy).

    A video becomes an animated GIF in an image summary under ``sample/NN`` — the record
    ``SummaryWriter.add_video`` writes, encoded here by Pillow (:func:`encode_gif`); TensorBoard's
    Images tab plays it. A one-frame sample (an image) is written with ``add_image``.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    for smp in samples:
        tag = f"sample/{smp.index:02d}"
        if smp.frames.shape[0] == 1:
            writer.add_image(tag, smp.frames[0], step, dataformats="HWC")
            continue
        _, h, w, c = smp.frames.shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=encode_gif(smp.frames, smp.fps))
        # the file writer add_video itself writes through
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class ValidationSampler:
    """Sample videos of the model being trained.

    Args:
        task: ``--task``.
        sample_prompts: prompt file (same format as ``--from_file``, :mod:`wanlora.inference.prompts`).
        vae_path, t5_path, t5_tokenizer: ``--vae``, ``--t5``, ``--t5_tokenizer``.
        clip_path: ``--clip``, the CLIP image encoder the Wan2.1 image tasks need (``i2v-14B``,
            ``flf2v-14B``); not loaded for the others.
        output_dir, output_name: files go to ``output_dir/sample/{output_name}_{step:06d}_{index:02d}_{seed}.mp4``.
        device: where sampling runs (default: CUDA when available).
        width, height, frames, steps, seed, guidance_scale, guidance_scale_high_noise, flow_shift:
            defaults for prompts without ``--w --h --f --s --d --g --fs`` (``None``: the task's
            value; size 256x256, 17 frames and 20 steps keep samples cheap).
        negative_prompt: default negative prompt (``None``: the task's official one).
        solver, cfg_batched: see :mod:`wanlora.inference.sampling`.
        text_encoder_dtype: dtype for encoding the prompts (default bf16 on CUDA, float32 on CPU).
        text_encoder_device: where the prompts are encoded (default ``device``; ``"cpu"`` keeps
            the 11 GB umT5-XXL off a GPU that already holds the DiT, at the cost of speed).
        fps: MP4 frame rate (default: the task's).

    Raises:
        FileNotFoundError / PromptFileError: the prompt file; ValueError: an image-to-video task
        with a prompt lacking ``--i`` (FLF2V: ``--ei``), or a Wan2.1 image task without ``clip_path``.
    """

    def __init__(self, task, sample_prompts, vae_path, t5_path, t5_tokenizer=None, output_dir=".",
                 output_name="lora", device=None, width: int = 256, height: int = 256, frames: int = 17,
                 steps: int = 20, seed: int = 42, guidance_scale: float | None = None,
                 guidance_scale_high_noise: float | None = None, flow_shift: float | None = None,
                 negative_prompt: str | None = None, solver: str = "unipc", cfg_batched: bool = True,
                 text_encoder_dtype: torch.dtype | None = None, text_encoder_device=None,
                 fps: int | None = None, clip_path=None):
        from wanlora.models import load_clip, load_text_encoder, load_vae
        from wanlora.video_io import read_image

        self.task = get_task(task)
        self.conditioning = conditioning_for(self.task)
        self.output_dir = Path(output_dir) / "sample"
        self.output_name = output_name
        self.device = default_device(device)
        self.fps = fps or self.task.fps
        self.solver, self.cfg_batched = solver, cfg_batched
        specs = read_prompt_file(sample_prompts) if not isinstance(sample_prompts, (list, tuple)) else list(sample_prompts)
        defaults = dict(width=width, height=height, frames=frames, steps=steps, seed=seed,
                        guidance_scale=guidance_scale, flow_shift=flow_shift,
                        negative_prompt=negative_prompt or self.task.negative_prompt)
        self.specs: list[PromptSpec] = [s.with_defaults(**defaults) for s in specs]
        self.guidance_scale_high_noise = guidance_scale_high_noise
        self.images, self.end_images = [], []
        for s in self.specs:
            if self.conditioning.requires_image and not s.image_path:
                raise ValueError(f"{sample_prompts}:{s.line}: {self.task.name} needs a first frame: add --i IMAGE")
            if self.conditioning.requires_end_image and not s.end_image_path:
                raise ValueError(f"{sample_prompts}:{s.line}: {self.task.name} needs a last frame: add --ei IMAGE")
            if self.conditioning.uses_control and not s.control_path:
                raise ValueError(f"{sample_prompts}:{s.line}: {self.task.name} needs a control video: add --cn VIDEO")
            self.images.append(read_image(s.image_path) if s.image_path else None)
            self.end_images.append(read_image(s.end_image_path) if s.end_image_path else None)
        self.clip = None
        if self.conditioning.uses_clip:
            if clip_path is None:
                raise ValueError(f"{self.task.name} samples need the CLIP image encoder: give --clip "
                                 "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)")
            clip_dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # the official clip_dtype
            self.clip = load_clip(clip_path, dtype=clip_dtype, device="cpu")

        dtype = text_encoder_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        te = load_text_encoder(t5_path, t5_tokenizer, dtype=dtype, device=text_encoder_device or self.device)
        with torch.no_grad():
            embs = te.encode([s.prompt for s in self.specs] + [s.negative_prompt for s in self.specs])
        n = len(self.specs)
        self.contexts = [e.detach().float().cpu() for e in embs[:n]]
        self.contexts_null = [e.detach().float().cpu() for e in embs[n:]]
        del te, embs
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.vae = load_vae(vae_path, dtype=torch.float32, device="cpu")
        logger.info("training samples: %d prompts encoded; text encoder freed", n)

    def requests(self) -> list[GenerationRequest]:
        """The generation request of each prompt (fixed seeds: the same noise at every sampling)."""
        out = []
        for s, img, end in zip(self.specs, self.images, self.end_images):
            out.append(GenerationRequest(
                prompt=s.prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                frames=s.frames, seed=s.seed, steps=s.steps, guidance_scale=s.guidance_scale,
                guidance_scale_high_noise=self.guidance_scale_high_noise if s.guidance_scale is None else None,
                flow_shift=s.flow_shift, solver=self.solver, image=img, image_path=s.image_path,
                end_image=end, end_image_path=s.end_image_path, control_path=s.control_path,
                cfg_batched=self.cfg_batched))
        return out

    def sample(self, step: int, dits, epoch: int | None = None,
               networks: Sequence[torch.nn.Module] = (), offload: bool = False) -> list[ValidationSample]:
        """Generate every prompt with the current weights and write the MP4s.

        Args:
            step: global step (file name ``{output_name}_{step:06d}_{index:02d}_{seed}.mp4``).
            dits: ``{"high_noise": dit, "low_noise": dit}`` (A14B; both needed) or the one DiT,
                with the LoRA being trained applied. Left on their devices.
            epoch: recorded in the logs only.
            networks: LoRA networks (or other modules) to put in eval mode while sampling.
            offload: bring each expert onto the sampler's device while it is used and park the
                other one on the CPU (for a frozen expert kept on the CPU during training); every
                model goes back to the device it came from afterwards. Default: models stay put and
                must already be on the sampler's ``device``.

        Returns:
            the :class:`ValidationSample` list (frames for TensorBoard).
        """
        from wanlora.video_io import to_uint8_frames, write_video

        mods = list(dits.values()) if isinstance(dits, Mapping) else [dits]
        mods += list(networks)
        modes = [m.training for m in mods]
        homes = [module_device(m) for m in mods]
        samples = []
        with preserve_rng_state(), torch.no_grad():
            try:
                for m in mods:
                    m.eval()
                self.vae.to(self.device)
                if self.clip is not None:
                    self.clip.to(self.device)
                pipe = WanPipeline(self.task, dits, vae=self.vae, device=self.device, offload=offload, clip=self.clip)
                for i, req in enumerate(self.requests()):
                    latent, video, r = pipe.generate(req, [self.contexts[i]], [self.contexts_null[i]])
                    path = self.output_dir / f"{self.output_name}_{step:06d}_{i:02d}_{r.seed}.mp4"
                    meta = {"prompt": r.prompt, "seed": str(r.seed), "step": str(step),
                            "epoch": "" if epoch is None else str(epoch)}
                    write_video(path, video, self.fps, metadata=meta)
                    samples.append(ValidationSample(i, r.prompt, r.seed, path, to_uint8_frames(video), self.fps))
                    logger.info("sample %d (step %d, epoch %s): %s", i, step, epoch, path)
            finally:
                self.vae.to("cpu")
                if self.clip is not None:
                    self.clip.to("cpu")
                for m, was, home in zip(mods, modes, homes):
                    m.train(was)
                    if offload and module_device(m) != home:
                        m.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return samples


class SampleHook:
    """The trainer's ``--sample_prompts`` hook: ``hook(step, epoch, networks)`` makes the samples.

    Samples are made on the main process by a :class:`ValidationSampler` (videos in
    ``OUTPUT_DIR/sample/``, also logged to TensorBoard by :func:`log_samples`); the other
    processes wait. Each expert is shown to the pipeline as an
    :class:`~wanlora.training.experts.ExpertView` of the one DiT module, which swaps in that expert's
    weights and enables its LoRA when called.

    ``--sample_lora PATH[:MULT]`` (``--sample_lora_high_noise``) adds LoRAs on top of the trained
    one in the samples only — a Lightning / distill LoRA previews the result at its few steps. Each
    file goes to its expert by :func:`wanlora.lora.apply.plan_loras` (its metadata, else its flag),
    is hooked beside the DiT's layers as a frozen :class:`~wanlora.lora.adapter.LoRAAdapterSet`
    (a LoKr/LoHa file: :class:`~wanlora.lora.lycoris_hooks.LycorisHooks`) (never merged into the weights being trained, never seen by the optimizer) and enabled only
    while its expert denoises; between samplings the adapters are detached and kept on the CPU.

    Args:
        config: the run's :class:`wanlora.training.config.TrainConfig`.
        task, plan: the run's task and :class:`~wanlora.training.experts.ExpertPlan`.
        dit, experts: the DiT module and its :class:`~wanlora.training.experts.ExpertWeights`.
        bundles: ``{lora key: LoraBundle}`` (:mod:`wanlora.training.lora_bundle`).
        accelerator: the run's ``Accelerator``.

    Raises:
        ValueError: a ``--sample_lora`` file that is not a LoRA (or LoKr/LoHa) of this DiT's layers.
    """

    def __init__(self, config, task, plan, dit, experts, bundles, accelerator):
        self.task, self.plan, self.dit, self.experts, self.bundles = task, plan, dit, experts, bundles
        self.accelerator = accelerator
        if task.has_experts and len(plan.dit_paths) == 1:
            logger.warning("samples: only the %s expert is loaded, so it denoises every step of the samples; "
                           "they show the LoRA, not the two-expert result", plan.experts[0])
        self.sampler = None
        if accelerator.is_main_process:
            files = config.model_files
            self.sampler = ValidationSampler(task, config.sampling.sample_prompts, vae_path=files.vae, t5_path=files.t5,
                                           t5_tokenizer=files.t5_tokenizer, clip_path=files.clip,
                                           output_dir=config.saving.output_dir,
                                           output_name=config.saving.output_name, device=accelerator.device)
        self.extra = self._extra_loras(config.sampling) if accelerator.is_main_process else []

    def _extra_loras(self, sampling) -> list[tuple[str | None, "LoRAAdapterSet"]]:
        """``(expert or None, adapters)`` of each ``--sample_lora`` file, detached, on the CPU."""
        from wanlora.lora.adapter import LoRAAdapterSet
        from wanlora.lora.apply import parse_lora_spec, plan_loras
        from wanlora.lora.layouts import lora_modules
        from wanlora.lora.lycoris_hooks import LycorisHooks

        low = [parse_lora_spec(s, "--sample_lora") for s in sampling.sample_lora]
        high = [parse_lora_spec(s, "--sample_lora_high_noise") for s in sampling.sample_lora_high_noise]
        if not low and not high:
            return []
        extra = []
        plans = plan_loras(self.task, [p for p, _ in low], [m for _, m in low], [p for p, _ in high], [m for _, m in high])
        for lp in plans:
            for expert in lp.experts:
                if expert is not None and expert not in self.plan.dit_paths:
                    logger.warning("--sample_lora %s is for the %s expert, which this run does not load; the samples "
                                   "go without it", lp.path, expert)
                    continue
                try:
                    modules = lora_modules(lp.state_dict, "default")
                    if any(m["kind"] != "lora" for m in modules.values()):  # LyCORIS LoKr / LoHa
                        adapters = LycorisHooks(self.dit, modules, lp.multiplier, source=lp.path)
                    else:
                        adapters = LoRAAdapterSet.from_weights(self.dit, lp.state_dict, lp.multiplier, source=lp.path)
                        adapters.load_adapter_weights(lp.state_dict, lp.path)
                except (ValueError, KeyError) as e:
                    raise ValueError(f"--sample_lora {lp.path}: cannot be stacked on the samples ({e}); it must be "
                                     "a LoRA (or LyCORIS LoKr/LoHa) of this model's layers") from None
                adapters.requires_grad_(False)
                logger.info("samples: LoRA %s x%g stacked on the %s", lp.path, lp.multiplier,
                            f"{expert} expert" if expert else "model")
                extra.append((expert, adapters.eval()))
        return extra

    def _activate(self, expert: str) -> None:
        from wanlora.training.lora_bundle import set_active

        self.experts.activate(expert)
        set_active(self.bundles, self.plan.lora_for(expert))
        for owner, adapters in self.extra:
            adapters.set_enabled(owner is None or owner == expert)

    def __call__(self, step: int, epoch: int | None, networks: Mapping[str, torch.nn.Module]) -> None:
        """Sample with the current weights (main process), then wait for every process."""
        from wanlora.training.experts import ExpertView

        if self.sampler is not None:
            plan = self.plan
            if self.task.has_experts:  # an expert this run does not have is stood in for by the one it has
                dits = {e: ExpertView(self.dit, e if e in plan.dit_paths else plan.experts[0], self._activate)
                        for e in self.task.experts}
            else:
                dits = ExpertView(self.dit, plan.experts[0], self._activate)
            sp = self.dit.sequence_parallel  # the main process samples alone: the whole sequence on it
            self.dit.set_sequence_parallel(None)
            # the adapters in the DiT's compute dtype (not float8 storage) on its device
            p = next(q for q in self.dit.parameters() if q.is_floating_point() and q.element_size() > 1)
            try:
                for _, adapters in self.extra:
                    adapters.to(device=p.device, dtype=p.dtype)
                    adapters.attach()
                samples = self.sampler.sample(step, dits, epoch=epoch,
                                              networks=list(networks.values()) + [a for _, a in self.extra])
            finally:
                for _, adapters in self.extra:
                    adapters.detach()
                    adapters.to("cpu")
                self.dit.set_sequence_parallel(sp)
            for tracker in self.accelerator.trackers:
                writer = getattr(tracker, "writer", None)
                if hasattr(writer, "add_image"):  # TensorBoard: animated GIFs, images (log_samples)
                    log_samples(writer, samples, step)
        self.accelerator.wait_for_everyone()
