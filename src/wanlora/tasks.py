"""The task table: the one place that knows each Wan model.

Every ``--task`` value in every command comes from :data:`TASKS`. The numbers are the official
release's, read from the configs of the official repositories:

* Wan2.2 (``Wan-Video/Wan2.2``): ``wan/configs/shared_config.py``, ``wan_t2v_A14B.py``,
  ``wan_i2v_A14B.py``, ``wan_ti2v_5B.py`` and ``generate.py`` (default sizes);
* Wan2.1 (``Wan-Video/Wan2.1``): ``wan/configs/__init__.py``, ``wan_t2v_14B.py``,
  ``wan_t2v_1_3B.py``, ``wan_i2v_14B.py`` and the defaults of its ``generate.py``: 50 steps,
  shift 5.0, guidance 5.0 for text-to-video; 40 steps and shift 5.0 (3.0 at 480P) for
  ``i2v-14B``; 50 steps and shift 16 for ``flf2v-14B`` (``generate.py`` gives 40 steps only to
  task names containing ``"i2v"``). The two image tasks prepend a phrase to the shared negative
  prompt (``"镜头晃动，"``; FLF2V adds ``"镜头切换，"`` in front of that).
* Wan2.1-Fun-Control (``alibaba-pai/Wan2.1-Fun-1.3B-Control``, ``-14B-Control``; model code in
  ``aigc-apps/VideoX-Fun``: ``videox_fun/models/wan_transformer3d.py``,
  ``videox_fun/pipeline/pipeline_wan_fun_control.py``), under musubi-tuner's task names
  ``t2v-1.3B-FC``, ``t2v-14B-FC``, ``i2v-14B-FC`` (its ``wan/configs/__init__.py``): the Wan2.1
  sizes and sampling defaults of the model they extend, 48 input channels (16 noisy latent + 16
  control latent + 16 start-image latent) and the CLIP image branch (``model_type "i2v"``).

Architecture sizes in the table are the official ones. They are used to *check* a checkpoint and
to name what a file holds; the model itself is built from the checkpoint's weight shapes
(:mod:`wanlora.models.loading`), so the tiny test models of the right family load too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Task", "TASKS", "get_task", "task_names", "EXPERTS", "expert_from_path", "DEFAULT_NEGATIVE_PROMPT",
    "Release", "T5_FILE", "TOKENIZER_DIR", "VAE_FILES", "release_task", "CLIP_FILE", "I2V_NEGATIVE_PROMPT",
    "FLF2V_NEGATIVE_PROMPT",
]

#: ``wan_shared_cfg.sample_neg_prompt`` of both official repositories (identical in Wan2.1 and
#: Wan2.2). The official pipelines encode this string for the unconditional pass whenever the
#: negative prompt is empty.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

#: ``wan/configs/wan_i2v_14B.py`` of Wan2.1: ``"镜头晃动，"`` ("shaky camera") + the shared prompt.
I2V_NEGATIVE_PROMPT = "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT

#: ``wan/configs/__init__.py`` of Wan2.1: ``"镜头切换，"`` ("scene cut") + the I2V-14B prompt.
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT

#: The two Wan2.2 A14B experts, in the order the sampler meets them.
EXPERTS = ("high_noise", "low_noise")

#: File names every official release shares (Hugging Face ``Wan-AI/Wan2.1-*`` and ``Wan2.2-*``):
#: the umT5 encoder weights and the tokenizer folder beside them.
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
#: The VAE file of each VAE kind in the official releases.
VAE_FILES = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}


@dataclass(frozen=True)
class Release:
    """Where a task's checkpoints are published and how its official repository is laid out.

    The file names are those of the Hugging Face repositories (``Files and versions``):

    * ``Wan-AI/Wan2.2-T2V-A14B`` / ``-I2V-A14B``: ``high_noise_model/`` and ``low_noise_model/``,
      each with ``config.json``, ``diffusion_pytorch_model.safetensors.index.json`` and the shards
      it names (``diffusion_pytorch_model-00001-of-00006.safetensors`` ...); ``Wan2.1_VAE.pth``;
      ``models_t5_umt5-xxl-enc-bf16.pth``; ``google/umt5-xxl/`` (``spiece.model``,
      ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``).
    * ``Wan-AI/Wan2.2-TI2V-5B`` and ``Wan-AI/Wan2.1-T2V-14B``: ``config.json``, the index and its
      shards at the top of the repository; ``Wan2.2_VAE.pth`` / ``Wan2.1_VAE.pth``; umT5 as above.
    * ``Wan-AI/Wan2.1-T2V-1.3B``: one ``diffusion_pytorch_model.safetensors`` + ``config.json``.
    * The ``-Diffusers`` repositories: ``model_index.json``, ``transformer/`` (the high-noise
      expert of A14B, or the only DiT), ``transformer_2/`` (A14B low-noise expert), ``vae/``,
      ``text_encoder/`` (transformers ``UMT5EncoderModel``), ``tokenizer/``, ``scheduler/``.

    Attributes:
        repo: the official repository id (layout of the Wan code's ``--ckpt_dir``).
        diffusers_repo: the diffusers-format repository id.
        dit_folders: per DiT role (``dit_high_noise``, ``dit_low_noise`` or ``dit``), the folder of
            the official repository that holds its weights (``""`` = the top).
        dit_weights: the DiT weight entry in that folder: the shard index, or the single file.
        vae_file: the official VAE file name.
        clip_file: the CLIP image encoder file of the Wan2.1 image-to-video releases, else ``None``.
    """

    repo: str
    diffusers_repo: str
    dit_folders: tuple[tuple[str, str], ...]
    dit_weights: str
    vae_file: str
    t5_file: str = T5_FILE
    tokenizer_dir: str = TOKENIZER_DIR
    clip_file: str | None = None


_SHARDED = "diffusion_pytorch_model.safetensors.index.json"
_EXPERT_FOLDERS = (("dit_high_noise", "high_noise_model"), ("dit_low_noise", "low_noise_model"))


def _release(repo: str, vae: str, experts: bool, weights: str = _SHARDED) -> Release:
    return Release(repo=repo, diffusers_repo=f"{repo}-Diffusers",
                   dit_folders=_EXPERT_FOLDERS if experts else (("dit", ""),),
                   dit_weights=weights, vae_file=VAE_FILES[vae])


#: The CLIP image encoder file of the Wan2.1 I2V-14B / FLF2V-14B releases.
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


def _clip_release(repo: str) -> Release:
    """A Wan2.1 image-to-video release: sharded DiT at the top, Wan2.1 VAE, umT5 and the CLIP file."""
    r = _release(repo, "wan2.1", experts=False)
    return Release(repo=r.repo, diffusers_repo=r.diffusers_repo, dit_folders=r.dit_folders,
                   dit_weights=r.dit_weights, vae_file=r.vae_file, clip_file=CLIP_FILE)


@dataclass(frozen=True)
class Task:
    """One ``--task``: the facts of one official Wan model.

    Attributes:
        name: the ``--task`` value (``t2v-A14B``, ...).
        family: ``"wan2.2"`` or ``"wan2.1"``.
        in_channels / out_channels: DiT input and output channels (36 -> 16 for I2V-A14B:
            16 noisy latent + 4 mask + 16 image latent).
        conditioning: the kind of image conditioning, a key of
            :data:`wanlora.conditioning.KINDS`: ``"none"`` (text-to-video), ``"i2v"`` (mask +
            image latent concatenated to the input, ``wan/image2video.py``), ``"i2v_clip"`` (the
            same plus the CLIP features of the image, Wan2.1 I2V-14B), ``"flf2v"`` (first and last
            frame, with CLIP features of both, Wan2.1 ``wan/first_last_frame2video.py``) or
            ``"ti2v"`` (clean first latent frame at timestep 0, ``wan/textimage2video.py``),
            ``"fun_control"`` / ``"fun_control_i2v"`` (Wan2.1-Fun-Control: control-video latents,
            without / with a start image). Code
            asks :func:`wanlora.conditioning.conditioning_for`, never this name.
        clip_frames: frames the CLIP image encoder sees (Wan2.1 ``clip_fea``): 0 for models
            without the image branch, 1 for ``i2v-14B`` (the first frame, 257 tokens), 2 for
            ``flf2v-14B`` (first and last frame, 2x257 tokens). A fact of the DiT's architecture
            (``img_emb``, FLF2V's ``emb_pos``), checked against checkpoints. The Fun-Control
            models have the branch (1) even without an image: they are then given zero features.
        vae: ``"wan2.1"`` (z=16, stride 4x8x8) or ``"wan2.2"`` (z=48, stride 4x16x16).
        vae_stride: (time, height, width) compression of the VAE.
        latent_channels: channels of the VAE latent (16 or 48).
        patch_size: DiT patch (time, height, width), (1, 2, 2) for every Wan model.
        dim, ffn_dim, num_heads, num_layers: the official DiT sizes.
        boundary: fraction of the 1000 training timesteps where the high-noise expert hands
            over to the low-noise one (``t >= boundary * 1000`` is high noise); ``None`` for
            single-model tasks.
        flow_shift: default sampling shift (``sample_shift``).
        flow_shift_480p: the official default shift at 480P (832x480 or 480x832) when it differs
            from ``flow_shift`` (3.0 for ``i2v-14B``), else ``None``; see :meth:`default_flow_shift`.
        guidance_scale: classifier-free guidance of the low-noise expert (or the only model).
        guidance_scale_high_noise: guidance of the high-noise expert (``None`` without experts).
        sample_steps: default denoising steps.
        fps: frames per second of the official outputs.
        frame_num: default pixel frame count (4n+1).
        size: default (width, height) in pixels, the official ``--size`` default.
        text_len: umT5 context length (512 rows, zero-padded).
        architecture: ``modelspec.architecture`` id for LoRA metadata (SwarmUI's ids).
        release: the published checkpoints (:class:`Release`): repository ids and file names,
            which ``--ckpt_dir`` resolves (:mod:`wanlora.models.checkpoints`); ``None`` when
            the task has no published checkpoints in the table (then only file flags work).
    """

    name: str
    family: str
    in_channels: int
    out_channels: int
    conditioning: str
    vae: str
    vae_stride: tuple[int, int, int]
    latent_channels: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    flow_shift: float
    guidance_scale: float
    sample_steps: int
    fps: int
    frame_num: int
    size: tuple[int, int]
    architecture: str
    boundary: float | None = None
    guidance_scale_high_noise: float | None = None
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    release: Release | None = None
    clip_frames: int = 0
    flow_shift_480p: float | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        """``("high_noise", "low_noise")`` for the A14B tasks, ``()`` for single models."""
        return EXPERTS if self.boundary is not None else ()

    @property
    def has_experts(self) -> bool:
        return self.boundary is not None

    @property
    def boundary_timestep(self) -> float | None:
        """The boundary on the 0..1000 timestep scale (875.0 / 900.0), or ``None``."""
        return None if self.boundary is None else self.boundary * 1000.0

    @property
    def pixel_unit(self) -> int:
        """Spatial size unit in pixels: VAE stride times patch size (16, or 32 for TI2V-5B)."""
        return self.vae_stride[1] * self.patch_size[1]

    @property
    def max_area(self) -> int:
        """Pixel area of the default size (the official ``max_area`` for image input)."""
        return self.size[0] * self.size[1]

    @property
    def dit_roles(self) -> tuple[str, ...]:
        """The DiT checkpoint roles: ``("dit_high_noise", "dit_low_noise")`` or ``("dit",)``."""
        return tuple(f"dit_{e}" for e in self.experts) or ("dit",)

    def timestep_range(self, expert: str | None) -> tuple[float, float]:
        """The (min, max) training timesteps on the 0..1000 scale of an expert.

        ``high_noise`` covers ``[boundary*1000, 1000]``, ``low_noise`` ``[0, boundary*1000]``;
        ``None`` (or a single-model task) covers ``[0, 1000]``.

        Raises:
            ValueError: an unknown expert name, or an expert asked of a single-model task.
        """
        if expert is None:
            return (0.0, 1000.0)
        if expert not in EXPERTS:
            raise ValueError(f"unknown expert {expert!r}; use one of {', '.join(EXPERTS)}")
        if not self.has_experts:
            raise ValueError(f"task {self.name} is a single model and has no {expert} expert")
        b = self.boundary_timestep
        return (b, 1000.0) if expert == "high_noise" else (0.0, b)

    @property
    def uses_clip(self) -> bool:
        """Whether the DiT takes CLIP image features (``clip_fea``; Wan2.1 I2V-14B / FLF2V-14B)."""
        return self.clip_frames > 0

    def default_flow_shift(self, width: int | None = None, height: int | None = None) -> float:
        """The official default sampling shift for a video of ``width`` x ``height`` pixels.

        ``flow_shift_480p`` when set and the area is at most 832x480 (Wan2.1 ``generate.py``:
        shift 3.0 for ``i2v-14B`` at ``832*480`` / ``480*832``), else ``flow_shift``.
        """
        if (self.flow_shift_480p is not None and width is not None and height is not None
                and width * height <= 832 * 480):
            return self.flow_shift_480p
        return self.flow_shift

    def guidance_for(self, expert: str | None) -> float:
        """Default guidance scale of an expert (the official ``sample_guide_scale`` tuple)."""
        if expert == "high_noise" and self.guidance_scale_high_noise is not None:
            return self.guidance_scale_high_noise
        return self.guidance_scale

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent shape ``(C, T, h, w)`` of a clip of ``frames`` pixel frames (4n+1) and size."""
        st, sh, sw = self.vae_stride
        return (self.latent_channels, (frames - 1) // st + 1, height // sh, width // sw)


_WAN21_VAE = dict(vae="wan2.1", vae_stride=(4, 8, 8), latent_channels=16)
_WAN22_VAE = dict(vae="wan2.2", vae_stride=(4, 16, 16), latent_channels=48)
_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="t2v-A14B", family="wan2.2", in_channels=16, out_channels=16,
            conditioning="none", **_WAN21_VAE, **_A14B,
            boundary=0.875, flow_shift=12.0, guidance_scale=3.0, guidance_scale_high_noise=4.0,
            sample_steps=40, fps=16, frame_num=81, size=(1280, 720),
            architecture="wan-2_2-text2video-14b/lora",
            release=_release("Wan-AI/Wan2.2-T2V-A14B", "wan2.1", experts=True),
        ),
        Task(
            name="i2v-A14B", family="wan2.2", in_channels=36, out_channels=16,
            conditioning="i2v", **_WAN21_VAE, **_A14B,
            boundary=0.900, flow_shift=5.0, guidance_scale=3.5, guidance_scale_high_noise=3.5,
            sample_steps=40, fps=16, frame_num=81, size=(1280, 720),
            architecture="wan-2_2-image2video-14b/lora",
            release=_release("Wan-AI/Wan2.2-I2V-A14B", "wan2.1", experts=True),
        ),
        Task(
            name="ti2v-5B", family="wan2.2", in_channels=48, out_channels=48,
            conditioning="ti2v", **_WAN22_VAE,
            dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
            flow_shift=5.0, guidance_scale=5.0, sample_steps=50, fps=24, frame_num=121,
            size=(1280, 704), architecture="wan-2_2-ti2v-5b/lora",
            release=_release("Wan-AI/Wan2.2-TI2V-5B", "wan2.2", experts=False),
        ),
        Task(
            name="t2v-14B", family="wan2.1", in_channels=16, out_channels=16,
            conditioning="none", **_WAN21_VAE, **_A14B,
            flow_shift=5.0, guidance_scale=5.0, sample_steps=50, fps=16, frame_num=81,
            size=(1280, 720), architecture="wan-2_1-text2video-14b/lora",
            release=_release("Wan-AI/Wan2.1-T2V-14B", "wan2.1", experts=False),
        ),
        Task(
            name="t2v-1.3B", family="wan2.1", in_channels=16, out_channels=16,
            conditioning="none", **_WAN21_VAE,
            dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
            flow_shift=5.0, guidance_scale=5.0, sample_steps=50, fps=16, frame_num=81,
            size=(832, 480), architecture="wan-2_1-text2video-1_3b/lora",
            release=_release("Wan-AI/Wan2.1-T2V-1.3B", "wan2.1", experts=False,
                             weights="diffusion_pytorch_model.safetensors"),
        ),
        Task(
            name="i2v-14B", family="wan2.1", in_channels=36, out_channels=16,
            conditioning="i2v_clip", clip_frames=1, **_WAN21_VAE, **_A14B,
            flow_shift=5.0, flow_shift_480p=3.0, guidance_scale=5.0, sample_steps=40, fps=16,
            frame_num=81, size=(1280, 720), negative_prompt=I2V_NEGATIVE_PROMPT,
            architecture="wan-2_1-image2video-14b/lora",
            # the 720P checkpoint (the default size); Wan-AI/Wan2.1-I2V-14B-480P has the same files
            release=_clip_release("Wan-AI/Wan2.1-I2V-14B-720P"),
        ),
        Task(
            name="flf2v-14B", family="wan2.1", in_channels=36, out_channels=16,
            conditioning="flf2v", clip_frames=2, **_WAN21_VAE, **_A14B,
            flow_shift=16.0, guidance_scale=5.0, sample_steps=50, fps=16,
            frame_num=81, size=(1280, 720), negative_prompt=FLF2V_NEGATIVE_PROMPT,
            architecture="wan-2_1-flf2v-14b/lora",
            release=_clip_release("Wan-AI/Wan2.1-FLF2V-14B-720P"),
        ),
        # Wan2.1-Fun-Control (V1.0): the base model's sizes and defaults, 48 input channels, the
        # CLIP image branch. Published as alibaba-pai/Wan2.1-Fun-{1.3B,14B}-Control (VideoX-Fun's
        # own layout, no diffusers variant): pass the files with --dit/--vae/--t5/--clip.
        Task(
            name="t2v-1.3B-FC", family="wan2.1", in_channels=48, out_channels=16,
            conditioning="fun_control", clip_frames=1, **_WAN21_VAE,
            dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
            flow_shift=5.0, guidance_scale=5.0, sample_steps=50, fps=16, frame_num=81,
            size=(832, 480), architecture="wan-2_1-fun-control-1_3b/lora",
        ),
        Task(
            name="t2v-14B-FC", family="wan2.1", in_channels=48, out_channels=16,
            conditioning="fun_control", clip_frames=1, **_WAN21_VAE, **_A14B,
            flow_shift=5.0, guidance_scale=5.0, sample_steps=50, fps=16, frame_num=81,
            size=(1280, 720), architecture="wan-2_1-fun-control-14b/lora",
        ),
        Task(
            name="i2v-14B-FC", family="wan2.1", in_channels=48, out_channels=16,
            conditioning="fun_control_i2v", clip_frames=1, **_WAN21_VAE, **_A14B,
            flow_shift=5.0, flow_shift_480p=3.0, guidance_scale=5.0, sample_steps=40, fps=16,
            frame_num=81, size=(1280, 720), negative_prompt=I2V_NEGATIVE_PROMPT,
            architecture="wan-2_1-fun-control-14b/lora",
        ),
    )
}


def expert_from_path(path) -> str | None:
    """The expert a checkpoint path names: ``high_noise``/``low_noise`` (also ``high-noise``)
    anywhere in the path (a ``str`` or ``os.PathLike``), or None when it names neither or both."""
    s = str(path).lower().replace("-", "_")
    found = [e for e in EXPERTS if e in s]
    return found[0] if len(found) == 1 else None


def task_names() -> list[str]:
    """The valid ``--task`` values, for argparse ``choices``."""
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """Look up a task by its ``--task`` name (a :class:`Task` passes through).

    Raises:
        ValueError: the name is not in the table; the message lists the valid names.
    """
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; --task must be one of: {', '.join(TASKS)}"
        ) from None


def release_task(repo_id: str) -> Task | None:
    """The task whose official or diffusers repository is ``repo_id`` (case-insensitive), or
    ``None`` for a repository the table does not know (a copy under another name)."""
    rid = repo_id.lower()
    for t in TASKS.values():
        if t.release is not None and rid in (t.release.repo.lower(), t.release.diffusers_repo.lower()):
            return t
    return None
