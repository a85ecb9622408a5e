"""The Wan generation pipeline: sizes, initial noise, I2V/TI2V conditioning, denoising, decoding.

One implementation of the official pipelines (``wan/text2video.py: WanT2V.generate``,
``wan/image2video.py: WanI2V.generate``, ``wan/textimage2video.py: WanTI2V.t2v / i2v``), used by
``wanlora-generate`` and by the samples taken during training (:mod:`wanlora.training.validation`).
For the same weights, prompt embeddings and seed it reproduces the official latents: the same
``torch.randn`` call for the initial noise, the same integer model timesteps and float32 update
sigmas (:mod:`wanlora.inference.sampling`), the same expert switch, the same I2V ``y`` and TI2V first-frame
replacement after every step.

Layouts: latents ``[C, T, h, w]`` (one sample; the solvers see ``[1, C, T, h, w]``), pixels
``[3, F, H, W]`` in [-1, 1], sizes as (height, width) unless named ``(W, H)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Mapping

import torch

from wanlora.conditioning import conditioning_for, control_pixels, with_clean_first_frame
from wanlora.inference.sampling import cfg_apply_pattern, expert_for_timestep, guided_velocity, make_schedule, make_solver
from wanlora.tasks import Task, get_task

__all__ = [
    "GenerationRequest",
    "Prepared",
    "WanPipeline",
    "initial_noise",
    "check_frames",
    "check_video_size",
    "module_device",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# sizes (the image sizes of I2V / TI2V: wanlora.conditioning)


def check_frames(task: Task, frames: int) -> int:
    """Validate a pixel frame count: ``4n+1`` (the VAE's temporal stride 4; 1 = an image).

    Raises:
        ValueError: frames not ``4n+1``; the message names the nearest valid count.
    """
    st = task.vae_stride[0]
    if frames < 1 or (frames - 1) % st:
        n = max(0, round((frames - 1) / st))
        raise ValueError(f"--video_length {frames} is not 4n+1 (the VAE's frame rule); use {st * n + 1}")
    return frames


def check_video_size(task: Task, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """Validate a text-to-video size ``(H, W, F)`` in pixels: frames ``4n+1``; height/width rounded
    down to the task's pixel unit (16, or 32 for TI2V-5B) with a warning.

    Raises:
        ValueError: frames not ``4n+1``, or a size smaller than one unit.
    """
    check_frames(task, frames)
    u = task.pixel_unit
    h, w = height // u * u, width // u * u
    if h < u or w < u:
        raise ValueError(f"--video_size {height} {width} is smaller than the task's unit of {u} pixels")
    if (h, w) != (height, width):
        logger.warning("video size %dx%d (HxW) rounded down to %dx%d (multiples of %d for %s)",
                       height, width, h, w, u, task.name)
    return h, w, frames


def initial_noise(shape, seed: int, device="cpu", cpu_noise: bool = False) -> torch.Tensor:
    """The official initial noise: one float32 ``torch.randn(shape, generator=Generator(device)
    .manual_seed(seed))`` on ``device`` (on the CPU with ``cpu_noise``), returned on ``device``.

    CPU and CUDA generators give different numbers for the same seed (as in the official code).
    """
    dev = torch.device("cpu") if cpu_noise else torch.device(device)
    g = torch.Generator(device=dev).manual_seed(int(seed))
    return torch.randn(*shape, dtype=torch.float32, generator=g, device=dev).to(device)


# ----------------------------------------------------------------------------------------------
# request


@dataclass
class GenerationRequest:
    """What to generate. ``None`` fields take the task's defaults.

    Attributes:
        prompt / negative_prompt: text (negative ``None`` or ``""``: the task's official one).
        height, width: pixels. Text-to-video: the size. With an image: only the *area* counts
            (the official ``max_area``); the aspect ratio comes from the image.
        frames: pixel frames ``4n+1`` (1 = an image).
        seed: noise seed. steps, guidance_scale (low-noise / only model),
        guidance_scale_high_noise (A14B), flow_shift, solver (``unipc``/``euler``/``dpm++``).
        image: PIL RGB first frame (``i2v-A14B``, ``i2v-14B``, ``flf2v-14B`` need one; ``ti2v-5B``
            optional; ignored by the text-to-video tasks). image_path: where it came from
            (recorded in the settings only).
        end_image / end_image_path: the last frame of ``flf2v-14B`` (PIL RGB) and its path.
        control_path: the control video of the Fun-Control tasks (a video file or a folder of
            frames; its first ``frames`` frames are fitted to the output size, see
            :func:`wanlora.conditioning.control_pixels`).
        cfg_skip_mode / cfg_apply_ratio: see :func:`wanlora.inference.sampling.cfg_apply_pattern`.
        cfg_batched: run the conditional and unconditional passes as one batch of 2.
    """

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    seed: int = 42
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_high_noise: float | None = None
    flow_shift: float | None = None
    solver: str = "unipc"
    image: object = None
    image_path: str | None = None
    end_image: object = None
    end_image_path: str | None = None
    control_path: str | None = None
    cfg_skip_mode: str = "none"
    cfg_apply_ratio: float | None = None
    cfg_batched: bool = True

    def settings(self) -> dict:
        """JSON-able settings (everything but the image object)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "end_image")}


@dataclass
class Prepared:
    """A resolved request: sizes, noise and conditioning, ready for :meth:`WanPipeline.denoise`.

    Attributes:
        request: the request with every default filled in.
        noise: float32 ``[C, T, h, w]``.
        y: I2V conditioning ``[20, T, h, w]`` (mask 4 + image latent 16), Fun-Control's
            ``[32, T, h, w]`` (control latent 16 + start latent 16), or ``None``.
        first_latent: TI2V clean image latent ``[C, 1, h, w]`` or ``None``.
        clip_fea: CLIP image features ``[257·n, 1280]`` (Wan2.1 I2V-14B / FLF2V-14B) or ``None``.
        context / context_null: the prompt's and the negative prompt's umT5 embeddings, each a list
            of one ``[L, d]`` tensor (unpadded; the DiT pads to 512).
    """

    request: GenerationRequest
    noise: torch.Tensor
    y: torch.Tensor | None = None
    first_latent: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None
    context: list = field(default_factory=list)
    context_null: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# the pipeline


class WanPipeline:
    """Denoise with ``{expert: dit}`` and decode with the VAE.

    Args:
        task: ``--task`` name or :class:`Task`.
        dits: ``{"high_noise": dit, "low_noise": dit}`` for A14B tasks, or one model (or
            ``{None: dit}``) for single-model tasks. Each is called ``dit(x, timestep, context, y)``.
            A single model is kept as ``self.dits[None]``: ``None`` is the expert
            :func:`~wanlora.inference.sampling.expert_for_timestep` names for a task without a
            boundary, the expert of its LoRAs (:class:`wanlora.lora.apply.LoraPlan` ``experts ==
            (None,)``) and the key of their adapters in ``extra_modules``.
        vae: a ``WanVAE`` (``encode``/``decode``), needed for images and decoding.
        clip: the CLIP image encoder (:func:`wanlora.models.load_clip`), needed by the Wan2.1
            image tasks (``i2v-14B``, ``flf2v-14B``).
        text_encoder: a ``TextEncoder`` (``encode(list[str])``) or ``None`` when contexts are
            given to :meth:`prepare`.
        device: where the denoising runs.
        offload: move the inactive expert and the text encoder off ``device`` to the CPU (and the
            active one onto it). Without it models stay where they are: they must be on ``device``
            (the inputs are not moved to them; only the velocity is brought back to ``device``).
        progress: show a tqdm bar over the steps.
    """

    def __init__(self, task, dits, vae=None, text_encoder=None, device="cpu", offload: bool = False,
                 progress: bool = False, clip=None):
        self.task = get_task(task)
        if not isinstance(dits, Mapping):
            dits = {None: dits}
        if self.task.has_experts:
            missing = [e for e in self.task.experts if e not in dits]
            if missing:
                raise ValueError(f"{self.task.name} needs both experts; missing {missing} "
                                 "(--dit is the low-noise expert, --dit_high_noise the high-noise one)")
        elif len(dits) != 1:
            raise ValueError(f"{self.task.name} is a single model; got {len(dits)} DiTs")
        self.dits = dict(dits)
        self.vae = vae
        self.clip = clip
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.offload = offload
        self.progress = progress
        self.conditioning = conditioning_for(self.task)
        self.extra_modules: dict = {}  # expert -> modules moved with it (dynamic LoRA networks)

    # -- placement -------------------------------------------------------------------------
    def _model_for(self, expert):
        if expert is None:
            return next(iter(self.dits.values()))
        return self.dits[expert]

    def _activate(self, expert):
        model = self._model_for(expert)
        if self.offload:
            for e, m in self.dits.items():
                if m is not model and module_device(m) != torch.device("cpu"):
                    m.to("cpu")
                    for extra in self.extra_modules.get(e, ()):
                        extra.to("cpu")
            if module_device(model) != self.device:
                model.to(self.device)
                for extra in self.extra_modules.get(expert, ()):
                    extra.to(self.device)
        return model

    # -- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> list[torch.Tensor]:
        """umT5 embeddings ``[L_i, d]`` of ``texts``; with ``offload`` the encoder visits the device
        and goes back to the CPU afterwards."""
        if self.text_encoder is None:
            raise ValueError("no text encoder loaded (--t5) and no precomputed contexts given")
        te = self.text_encoder
        if self.offload:
            te.to(self.device)
        out = te.encode(list(texts))
        if self.offload:
            te.to("cpu")
        return out

    # -- preparation -----------------------------------------------------------------------
    def resolve(self, req: GenerationRequest) -> GenerationRequest:
        """Fill ``None`` fields from the task defaults (a copy). An empty negative prompt becomes
        the task's official one (never an empty-string encoding, §9.6); a single guidance scale
        sets both A14B experts (the official float ``guide_scale``, §9.4)."""
        t = self.task
        r = replace(req)
        if r.negative_prompt is None or r.negative_prompt == "":
            r.negative_prompt = t.negative_prompt
        r.width = r.width or t.size[0]
        r.height = r.height or t.size[1]
        r.frames = r.frames or t.frame_num
        r.steps = r.steps or t.sample_steps
        r.guidance_scale = t.guidance_scale if r.guidance_scale is None else r.guidance_scale
        if t.has_experts and r.guidance_scale_high_noise is None:
            r.guidance_scale_high_noise = (
                t.guidance_scale_high_noise if req.guidance_scale is None else r.guidance_scale
            )
        if r.flow_shift is None:  # the official default at this area (i2v-14B: 3.0 at 480P)
            r.flow_shift = t.default_flow_shift(r.width, r.height)
        return r

    @torch.no_grad()
    def prepare(self, req: GenerationRequest, context=None, context_null=None, cpu_noise: bool = False) -> Prepared:
        """Resolve sizes, draw the initial noise and build the image conditioning.

        ``context``/``context_null``: precomputed ``[L, d]`` embeddings (else the text encoder runs).
        Sizes: T2V as given (rounded down to the pixel unit); with an image, the task's
        conditioning (:mod:`wanlora.conditioning`) sizes it from the image and the area
        ``height·width`` (I2V-A14B :func:`~wanlora.conditioning.i2v_size`, TI2V-5B
        :func:`~wanlora.conditioning.best_output_size`) and builds ``y`` or the first latent. The
        noise is drawn once, ``[C, T, h, w]`` (:func:`initial_noise`), before any conditioning.

        Fun-Control reads the request's control video at the resolved size
        (:func:`wanlora.conditioning.control_pixels`) and builds its ``y`` from it.

        Raises:
            ValueError: an I2V task without an image, a Fun-Control task without a control video (or
                one shorter than the frames), a bad frame count or size, no VAE for an image.
        """
        t, cond = self.task, self.conditioning
        r = self.resolve(req)
        frames = check_frames(t, r.frames)
        st, sh, sw = t.vae_stride
        T = (frames - 1) // st + 1
        if r.image is None and cond.requires_image:
            raise ValueError(f"{t.name} is image-to-video: give --image_path (or --i in a prompt file)")
        if r.end_image is None and cond.requires_end_image:
            raise ValueError(f"{t.name} generates from a first and a last frame: give --end_image_path "
                             "(or --ei in a prompt file)")
        image = None if r.image is None else cond.image_pixels(t, r.image, r.width * r.height)
        if image is None:
            if r.image is not None:
                logger.warning("%s is text-to-video: the image %s is ignored", t.name, r.image_path or "")
            H, W, _ = check_video_size(t, r.height, r.width, frames)
        else:
            pixels, (H, W) = image
        r.height, r.width = H, W
        noise = initial_noise((t.latent_channels, T, H // sh, W // sw), r.seed, self.device, cpu_noise)
        y = first = clip_fea = None
        control = None
        if cond.uses_control:
            control = control_pixels(r.control_path, frames, H, W)
        elif r.control_path is not None:
            logger.warning("%s is not a Fun-Control task: the control video %s is ignored", t.name, r.control_path)
        if image is not None or control is not None:
            self._need_vae()
            if self.offload and self.clip is not None:
                self.clip.to(self.device)
            inputs = cond.encode_image(self.vae, pixels if image is not None else None, frames, self.device,
                                       clip=self.clip, image=r.image, end_image=r.end_image, control=control)
            if self.offload and self.clip is not None:
                self.clip.to("cpu")
            y, first, clip_fea = inputs.y, inputs.first_latent, inputs.clip_fea
        if context is None:
            context, context_null = self.encode_text([r.prompt]), self.encode_text([r.negative_prompt])
        elif context_null is None:
            context_null = self.encode_text([r.negative_prompt])
        return Prepared(request=r, noise=noise, y=y, first_latent=first, clip_fea=clip_fea,
                        context=_as_list(context), context_null=_as_list(context_null))

    def _need_vae(self):
        if self.vae is None:
            raise ValueError("this request needs the VAE (--vae): image conditioning or decoding")

    # -- denoising -------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, p: Prepared, callback: Callable | None = None) -> torch.Tensor:
        """Run the sampler; returns the final latent float32 ``[C, T, h, w]`` on ``device``.

        Per step ``i`` with integer timestep ``t_i``: pick the expert (``t_i >= boundary·1000`` ->
        high noise) and its guidance scale, build the model timestep (``[1]``, or ``[1, T]`` for
        TI2V-5B with frame 0 at 0 when an image is given: the official per-token ``[1, seq_len]``
        tensor is constant within a latent frame), take the guided velocity and step the solver;
        TI2V puts the clean first-frame latent back after every step (``textimage2video.py: i2v``;
        the official ``(1 − mask2)·z + mask2·x`` with 0/1 masks is exactly that assignment).
        ``callback(i, t, latent)`` (``latent`` ``[C, T, h, w]``) is called after each step.
        """
        r = p.request
        t = self.task
        sched = make_schedule(r.steps, r.flow_shift, r.solver)
        solver = make_solver(r.solver, sched)
        apply = cfg_apply_pattern(len(sched), r.cfg_skip_mode, r.cfg_apply_ratio)
        if r.cfg_skip_mode != "none":
            logger.info("CFG skip mode %s: %s (A = CFG applied, S = skipped)", r.cfg_skip_mode,
                        "".join("A" if a else "S" for a in apply))
        guidance = {"high_noise": r.guidance_scale_high_noise, "low_noise": r.guidance_scale, None: r.guidance_scale}
        ctx = [c.to(self.device) for c in p.context]
        null = [c.to(self.device) for c in p.context_null]
        x = p.noise[None].to(self.device)
        z = None if p.first_latent is None else p.first_latent[None].to(self.device)
        if z is not None:
            x = with_clean_first_frame(x, z)
        y = None if p.y is None else p.y[None].to(self.device)
        clip_fea = None if p.clip_fea is None else p.clip_fea[None].to(self.device)
        steps = sched.timesteps
        it = enumerate(steps)
        if self.progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(steps), desc="denoising", leave=False)
        last_expert = object()
        for i, ts in it:
            expert = expert_for_timestep(ts, t.boundary)
            if expert != last_expert:
                if expert is not None:
                    logger.debug("step %d (t=%d): %s expert", i, int(ts), expert)
                model = self._activate(expert)
                last_expert = expert
            tt = self.conditioning.model_timestep(ts, x.shape[2], z is not None, self.device)
            v = guided_velocity(model, x, tt, ctx, null, guidance[expert], y=y,
                                apply_cfg=apply[i], batched=r.cfg_batched, clip_fea=clip_fea)
            x = solver.step(v.to(x.device), x)
            if z is not None:
                x = with_clean_first_frame(x, z)
            if callback is not None:
                callback(i, int(ts), x[0])
        return x[0]

    # -- decoding --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent ``[C, T, h, w]`` -> video float32 ``[3, F, H, W]`` in [-1, 1] on the CPU.
        With ``offload`` the DiTs leave the device first."""
        self._need_vae()
        if self.offload:
            for m in self.dits.values():
                m.to("cpu")
        return self.vae.decode(latent[None].float())[0].cpu()

    def generate(self, req: GenerationRequest, context=None, context_null=None, cpu_noise: bool = False,
                 decode: bool = True):
        """prepare + denoise (+ decode). Returns ``(latent [C,T,h,w] CPU, video [3,F,H,W] in [-1, 1]
        or None, resolved request)``.

        Raises:
            ValueError: what :meth:`prepare` rejects, or decoding without a VAE.
        """
        p = self.prepare(req, context, context_null, cpu_noise=cpu_noise)
        latent = self.denoise(p)
        video = self.decode(latent) if decode else None
        return latent.cpu(), video, p.request


def _as_list(ctx) -> list[torch.Tensor]:
    if isinstance(ctx, torch.Tensor):
        return [ctx] if ctx.ndim == 2 else list(ctx.unbind(0))
    return list(ctx)


def module_device(module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
