"""Image conditioning of the Wan tasks, in one place: caching, training and generation use it.

Each ``--task`` names its conditioning kind in the task table (:attr:`wanlora.tasks.Task.conditioning`);
:func:`conditioning_for` turns that name into one object, once, and every stage asks the object:

=====================  =====================================  ============================================
kind (class)           tasks                                  what the DiT sees
=====================  =====================================  ============================================
``"none"``             t2v-A14B, t2v-14B, t2v-1.3B            noisy latent only
(:class:`TextToVideo`)
``"i2v"``              i2v-A14B                               ``y = concat(mask 4, image latent 16)``
(:class:`ImageToVideo`)                                       after x on channels, the same at every step
``"ti2v"``             ti2v-5B                                clean latent frame 0 at timestep 0
(:class:`FirstFrameLatent`)                                   (per-frame timesteps ``[B, F]``)
``"fun_control"``      t2v-1.3B-FC, t2v-14B-FC                ``y = concat(control latent 16, zeros 16)``,
(:class:`FunControl`)                                         zero CLIP features
``"fun_control_i2v"``  i2v-14B-FC                             ``y = concat(control latent 16, start 16)``
(:class:`FunControlImage`)                                    (start latent in frame 0), CLIP features
=====================  =====================================  ============================================

The stages:

* caching (:mod:`wanlora.dataset.latent_caching`): :meth:`Conditioning.cache_tensors` gives the
  extra tensors a latent cache holds (named by :attr:`Conditioning.cache_keys`, each recorded
  as ``has_<key> = "1"`` in the cache metadata); the training dataset loads those keys into the
  batch;
* training (:func:`wanlora.training.trainer.flow_matching_loss`): :meth:`Conditioning.training_inputs`
  turns the batch and the noised latent into the model inputs and the loss mask, and
  :func:`per_sample_mse` reduces the error with that mask;
* generation (:class:`wanlora.inference.pipeline.WanPipeline`): :meth:`Conditioning.image_pixels`
  sizes and resizes the image as the official pipeline does, :meth:`Conditioning.encode_image`
  builds ``y`` or the clean first latent, :meth:`Conditioning.model_timestep` the timestep tensor
  of one step, :func:`with_clean_first_frame` puts the first latent back after each step.

Numerics follow the official code (``reference/wan_numerics.md`` §5 for I2V-A14B, §6 for
TI2V-5B); the cached ``y`` equals, bit for bit, the ``y`` the pipeline builds for the same image
at the same size (``tests/test_conditioning.py``).

The Wan2.1 image models (``reference/wan21_image_models.md``) add CLIP image features
(``clip_fea``, from :func:`wanlora.models.load_clip`): cached beside ``y`` (``--clip`` of
``wanlora-cache-latents``), passed to the DiT as ``clip_fea`` by both DiT call sites (the trainer's
model function and :func:`wanlora.inference.sampling.guided_velocity`) through
:class:`TrainingInputs` / :class:`ImageInputs`. FLF2V's mask and ``y`` mark the first and the last
frame (``known_frames = (0, -1)``, the official ``msk[:, 1:-1] = 0``).

Wan2.1-Fun-Control (VideoX-Fun ``pipeline_wan_fun_control.py``, musubi-tuner's ``-FC`` tasks) reads
a control video beside the target: caching encodes the control clip's frames at the target
window's frame numbers (``latents_control``), training and generation concatenate
:func:`fun_control_y` after the noisy latent (48 DiT input channels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wanlora.tasks import TASKS, Task, get_task
from wanlora.transfer import to_device

__all__ = [
    "Conditioning", "TextToVideo", "ImageToVideo", "ClipImageToVideo", "FirstLastFrameToVideo", "FirstFrameLatent",
    "KINDS", "conditioning_for", "clip_features", "flf2v_last_frame",
    "TrainingInputs", "ImageInputs", "FunControl", "FunControlImage", "fun_control_y", "blank_clip_features",
    "control_pixels", "frames_to_video", "BLANK_CLIP_SHAPE",
    "i2v_mask", "i2v_y", "clean_first_frame", "with_clean_first_frame", "per_sample_mse",
    "i2v_size", "best_output_size", "image_to_tensor", "i2v_image", "ti2v_image",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# I2V-A14B: mask and y (wan/image2video.py: WanI2V.generate; wan_numerics.md §5)


def _frame_indices(known_frames: Sequence[int], frames: int) -> list[int]:
    return sorted({k % frames for k in known_frames})


def i2v_mask(frames: int, lat_h: int, lat_w: int, known_frames: Sequence[int] = (0,), device=None) -> torch.Tensor:
    """The 4-channel I2V mask ``[4, T, lat_h, lat_w]`` float32, ``T = (frames − 1)/4 + 1`` (§5.4, ``msk``
    of ``wan/image2video.py: WanI2V.generate``).

    The pixel mask ``m[0..frames−1]`` is 1 at ``known_frames`` (negative indices count from the end:
    ``(0, -1)`` is the first and the last frame, FLF2V) and 0 elsewhere; frame 0 is repeated four
    times (length ``frames + 3 = 4T``), the result reshaped to ``[T, 4]`` and transposed, so
    channel ``c`` of latent frame ``τ`` is ``m'[4τ + c]``. With the first frame only, latent frame 0
    is all ones and the rest zeros.

    Raises:
        ValueError: ``frames`` not ``4n+1``.
    """
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"i2v_mask: {frames} frames is not 4n+1 (the VAE's frame rule)")
    m = torch.zeros(frames, device=device)
    m[_frame_indices(known_frames, frames)] = 1.0
    m = torch.cat([m[:1].repeat(4), m[1:]])
    t = (frames - 1) // 4 + 1
    return m.view(t, 4).transpose(0, 1)[:, :, None, None].expand(4, t, lat_h, lat_w).contiguous()


def i2v_y(vae, videos: torch.Tensor, known_frames: Sequence[int] = (0,)) -> torch.Tensor:
    """The I2V conditioning ``y`` ``[B, 4 + z, T, h, w]`` float32 of pixel videos ``[B, 3, F, H, W]`` in [−1, 1].

    The ``known_frames`` are kept and every other frame is set to zero (mid-gray, not noise, §5.3);
    that video goes through the VAE (``z`` = 16 channels for the Wan2.1 VAE) and the 4-channel
    :func:`i2v_mask` goes first: ``concat([mask, image_latent])`` on channels (§5.5).

    Args:
        vae: anything with ``encode(video [B, 3, F, H, W]) -> [B, z, T, h, w]`` (a ``WanVAE``).
        videos: the clip (caching: the window's frames) or the image followed by any frames
            (generation: zeros); only ``known_frames`` are read.
    """
    frames = videos.shape[2]
    idx = _frame_indices(known_frames, frames)
    cond = torch.zeros_like(videos)
    cond[:, :, idx] = videos[:, :, idx]
    lat = vae.encode(cond).float()
    b, _, _, h, w = lat.shape
    mask = i2v_mask(frames, h, w, known_frames).to(lat)
    return torch.cat([mask.unsqueeze(0).expand(b, -1, -1, -1, -1), lat], dim=1)


# ----------------------------------------------------------------------------------------------
# TI2V-5B: clean first latent frame (wan/textimage2video.py: WanTI2V.i2v; wan_numerics.md §6)


def clean_first_frame(x0: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor, chosen: torch.Tensor):
    """Training inputs with a clean latent frame 0 for the ``chosen`` samples (§6.2, §6.3).

    Args:
        x0: ``[B, C, F, h, w]`` clean latents; x_t: the noised latents, same shape (not modified).
        timestep: ``[B]`` on 0..1000.
        chosen: bool ``[B]`` on ``x0``'s device: samples whose frame 0 is given.

    No host synchronization (selections by ``torch.where``, not boolean indexing).

    Returns:
        ``(x_t, timestep, loss_mask)``: ``x_t`` with frame 0 of the chosen samples replaced by
        ``x0``'s; ``timestep`` ``[B, F]``, each frame at the sample's timestep and frame 0 of the
        chosen samples at 0 (the official per-token tensor is constant within a latent frame);
        ``loss_mask`` float ``[B, 1, F, 1, 1]``, 0 on the given frames (they are not predicted).
    """
    b, f = x0.shape[0], x0.shape[2]
    x_t = x_t.clone()
    x_t[:, :, 0] = torch.where(chosen.view(b, 1, 1, 1), x0[:, :, 0], x_t[:, :, 0])
    timestep = timestep[:, None].repeat(1, f)
    timestep[:, 0] = torch.where(chosen, torch.zeros_like(timestep[:, 0]), timestep[:, 0])
    keep = torch.ones(b, 1, f, 1, 1, device=x0.device)
    keep[:, 0, 0] = (~chosen).to(keep.dtype).view(b, 1, 1)
    return x_t, timestep, keep


def with_clean_first_frame(x: torch.Tensor, first_latent: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, T, h, w]`` with latent frame 0 replaced by ``first_latent`` ``[B, C, 1, h, w]``:
    the official ``(1 − mask2)·z + mask2·x`` of ``WanTI2V.i2v`` (0/1 masks: exactly this assignment),
    applied to the initial noise and after every solver step (§6.2)."""
    return torch.cat([first_latent, x[:, :, 1:]], dim=2)


def per_sample_mse(err: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the squared error ``err`` ``[B, C, F, h, w]`` per sample, ``[B]``; with ``loss_mask`` the
    weighted mean ``Σ err·w / Σ w`` over the elements of ``err`` (each weight counted once per element
    it broadcasts to).

    Args:
        loss_mask: weights >= 0 broadcastable to ``err`` with one channel: ``[B, 1, F, 1, 1]`` (0/1
            frames, :func:`clean_first_frame`: ``Σ err·w / (Σ w · C·h·w)``), or ``[B, 1, F, h, w]``
            (per-cell loss weights, :mod:`wanlora.dataset.masks`: ``Σ err·w / (Σ w · C)``). All ones
            gives the plain mean; a sample whose weights are all 0 gives 0 (it trains nothing).
    """
    if loss_mask is None:
        return err.mean(dim=(1, 2, 3, 4))
    w = loss_mask.to(err.dtype)
    elements_per_weight = err[0].numel() // w[0].numel()
    total = w.sum(dim=(1, 2, 3, 4)) * elements_per_weight
    return (err * w).sum(dim=(1, 2, 3, 4)) / total.clamp_min(torch.finfo(err.dtype).tiny)


# ----------------------------------------------------------------------------------------------
# image sizes and pixels of the official pipelines


def i2v_size(image_w: int, image_h: int, max_area: int, vae_stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """I2V-A14B output size ``(H, W)`` in pixels for an image of ``image_w x image_h``
    (``wan/image2video.py: WanI2V.generate``, §5.1): the image's aspect ratio at ``max_area`` pixels,
    each latent side floored to a multiple of the patch (so ``H, W`` are multiples of 16).

    Raises:
        ValueError: ``max_area`` too small for the image's aspect ratio (a side under one patch;
            the official code would go on with an empty latent).
    """
    aspect = image_h / image_w
    lat_h = round(np.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect) // vae_stride // patch * patch)
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"the area {max_area} px (--video_size / --w --h) is too small for a {image_w}x{image_h} "
                         f"image: a side would be under {vae_stride * patch} pixels")
    return int(lat_h * vae_stride), int(lat_w * vae_stride)


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """TI2V-5B output size ``(W, H)`` in pixels for an image of ``w x h`` (``wan/utils/utils.py:
    best_output_size``, §6.1): of the width-first and the height-first rounding to multiples of
    ``(dw, dh)`` within ``expected_area``, the one whose aspect ratio is closer to the image's
    (height-first on a tie, as the official comparison is strict).

    A candidate with a zero side is skipped (the official function divides by zero there).

    Raises:
        ValueError: both candidates have a zero side (the area is too small for the aspect ratio).
    """
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    candidates = []  # height-first first: min() keeps the first of equals, the official tie-break
    oh2 = int(oh // dh * dh)
    if oh2 > 0:
        candidates.append((int(expected_area / oh2 // dw * dw), oh2))
    ow1 = int(ow // dw * dw)
    if ow1 > 0:
        candidates.append((ow1, int(expected_area / ow1 // dh * dh)))
    candidates = [(cw, ch) for cw, ch in candidates if cw > 0 and ch > 0]
    if not candidates:
        raise ValueError(f"the area {expected_area} px (--video_size / --w --h) is too small for a {w}x{h} "
                         f"image: a side would be under {min(dw, dh)} pixels")
    return min(candidates, key=lambda c: max(ratio / (c[0] / c[1]), (c[0] / c[1]) / ratio))


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> float32 ``[3, H, W]`` in [-1, 1] (``TF.to_tensor(img).sub_(0.5).div_(0.5)``)."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255).sub_(0.5).div_(0.5)


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames ``[F, H, W, 3]`` -> float32 video ``[3, F, H, W]`` in [-1, 1] (``x / 127.5 − 1``)."""
    x = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


def i2v_image(image, height: int, width: int) -> torch.Tensor:
    """The I2V first frame ``[3, H, W]``: bicubic resize without antialias or clamp (§5.2)."""
    x = image_to_tensor(image)[None]
    return F.interpolate(x, size=(height, width), mode="bicubic")[0]


def ti2v_image(image, max_area: int, unit: int = 32):
    """The TI2V-5B first frame ``[3, oh, ow]`` and its size ``(oh, ow)``: best_output_size, PIL
    LANCZOS resize by ``max(ow/iw, oh/ih)`` with rounded sizes, center crop (§6.1;
    ``wan/textimage2video.py: WanTI2V.i2v``). Values in [-1, 1] from ``to_tensor``.

    Raises:
        ValueError: ``max_area`` too small for the image (see :func:`best_output_size`).
    """
    from PIL import Image

    iw, ih = image.width, image.height
    ow, oh = best_output_size(iw, ih, unit, unit, max_area)
    scale = max(ow / iw, oh / ih)
    img = image.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    return image_to_tensor(img), (oh, ow)


# ----------------------------------------------------------------------------------------------
# the conditioning objects


@dataclass
class TrainingInputs:
    """What one training batch feeds the DiT, and which frames the loss counts.

    Attributes:
        x_t: ``[B, C, F, h, w]`` the noised latents (frame 0 clean for TI2V-conditioned samples).
        timestep: ``[B]``, or ``[B, F]`` when some sample has a clean first frame; 0..1000.
        y: ``[B, C_y, F, h, w]`` float32 I2V conditioning from the cache, or ``None``.
        loss_mask: ``[B, 1, F, 1, 1]`` 0/1 frames counted by the loss, or ``None`` (all).
        clip_fea: ``[B, 257·n, 1280]`` float32 CLIP features from the cache (Wan2.1 image
            models), or ``None``.
    """

    x_t: torch.Tensor
    timestep: torch.Tensor
    y: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None


@dataclass
class ImageInputs:
    """What generation derives from the image: ``y`` ``[C_y, T, h, w]`` (I2V) or the clean first
    latent ``[C, 1, h, w]`` (TI2V), and the CLIP features ``clip_fea`` ``[257·n, 1280]`` (Wan2.1
    image models); float32 on the pipeline's device; ``None`` where not used."""

    y: torch.Tensor | None = None
    first_latent: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of a task; this base is text-to-video (no image).

    Class attributes:
        kind: the task table's name (:attr:`wanlora.tasks.Task.conditioning`), recorded in caches.
        model_type: the official ``WanModel`` ``model_type`` (``config.json`` of a checkpoint).
        image_input: ``"required"``, ``"optional"`` or ``"ignored"`` (generation's image).
        cache_keys: tensors a latent cache holds besides ``latents``.
        label: how messages name the cached conditioning.
        trains_first_frame: whether ``--ti2v_first_frame`` applies; first_frame_note: why not.
        requires_end_image: generation needs a last frame too (``--end_image_path`` / ``--ei``).
        uses_clip: caching and generation need the CLIP image encoder (``--clip``).
        uses_control: caching and generation need a control video (Fun-Control: the dataset's
            ``control_directory`` / JSONL ``control_path``, ``--control_path``).
    """

    kind: ClassVar[str] = "none"
    requires_end_image: ClassVar[bool] = False
    uses_control: ClassVar[bool] = False
    uses_clip: ClassVar[bool] = False
    model_type: ClassVar[str] = "t2v"
    image_input: ClassVar[str] = "ignored"
    cache_keys: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str] = "no image conditioning"
    trains_first_frame: ClassVar[bool] = False
    first_frame_note: ClassVar[str] = "is text-to-video"

    @property
    def requires_image(self) -> bool:
        """Generation cannot run without an image (``--image_path`` / ``--i``)."""
        return self.image_input == "required"

    @property
    def uses_image(self) -> bool:
        """An image given to generation is used (required or optional)."""
        return self.image_input != "ignored"

    # -- caching -------------------------------------------------------------------------------
    def cache_tensors(self, vae, videos: torch.Tensor, clip=None, control=None) -> dict[str, torch.Tensor]:
        """The tensors a latent cache holds besides ``latents``, each ``[B, ...]`` float32, for
        pixel videos ``[B, 3, F, H, W]`` in [−1, 1] (keys: :attr:`cache_keys`); ``clip`` is the
        CLIP image encoder where :attr:`uses_clip`, ``control`` the control videos (same shape as
        ``videos``) where :attr:`uses_control`."""
        return {}

    # -- training ------------------------------------------------------------------------------
    def training_inputs(self, batch: Mapping, x0: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor,
                        generator: torch.Generator) -> TrainingInputs:
        """The model inputs of one batch (:class:`TrainingInputs`), on ``x0``'s device.

        Args:
            batch: the training batch (its :attr:`cache_keys` tensors are read).
            x0, x_t: ``[B, C, F, h, w]`` clean and noised latents; timestep ``[B]`` on 0..1000.
            generator: the batch's CPU generator (draws only when a conditioning needs them, after
                the noise and the timesteps).
        """
        return TrainingInputs(x_t, timestep)

    # -- generation ----------------------------------------------------------------------------
    def image_pixels(self, task: Task, image, max_area: int):
        """The image's pixels ``[3, H, W]`` in [−1, 1] at the official output size, and ``(H, W)``;
        ``None`` when this conditioning does not use an image (then the request's size applies)."""
        return None

    def encode_image(self, vae, pixels: torch.Tensor, frames: int, device, clip=None, image=None,
                     end_image=None, control=None) -> ImageInputs:
        """The image inputs of generation (:class:`ImageInputs`) from :meth:`image_pixels`'s pixels;
        the Wan2.1 image models also read ``clip`` (the CLIP encoder), the PIL ``image`` as given
        and the PIL ``end_image`` (FLF2V's last frame); Fun-Control reads ``control``, the control
        video ``[3, F, H, W]`` in [−1, 1] (:func:`control_pixels`; ``pixels`` is ``None`` there
        when no image is used)."""
        return ImageInputs()

    def model_timestep(self, t: torch.Tensor, frames: int, first_latent: bool, device) -> torch.Tensor:
        """The timestep of one denoising step: ``[1]`` (``t`` a scalar tensor, kept in its dtype)."""
        return t.view(1).to(device)


class TextToVideo(Conditioning):
    """Text-to-video: no image (``wan/text2video.py``)."""


@dataclass(frozen=True)
class ImageToVideo(Conditioning):
    """I2V-A14B (§5): ``y = concat(mask, image_latent)`` beside the noisy latent, every step.

    Attributes:
        known_frames: the pixel frames the mask marks and the VAE sees (``(0,)``; see
            :func:`i2v_mask`).
        mask_given_frames: training only (``--i2v_mask_first_frame``): leave the latent frames the
            conditioning gives whole (the mask of ``y`` is 1 on all 4 channels: frame 0) out of
            the loss; a one-frame window keeps its frame.
    """

    kind: ClassVar[str] = "i2v"
    model_type: ClassVar[str] = "i2v"
    image_input: ClassVar[str] = "required"
    cache_keys: ClassVar[tuple[str, ...]] = ("y",)
    label: ClassVar[str] = "I2V conditioning 'y'"
    first_frame_note: ClassVar[str] = "takes its first frame from the cached y"
    known_frames: tuple[int, ...] = (0,)
    mask_given_frames: bool = False

    def cache_tensors(self, vae, videos, clip=None, control=None):
        """``{"y": [B, 20, T, h, w]}`` from each window's first frame (:func:`i2v_y`)."""
        return {"y": i2v_y(vae, videos, self.known_frames)}

    def training_inputs(self, batch, x0, x_t, timestep, generator):
        """The cached ``y`` in float32 on ``x0``'s device, the same for every timestep; with
        :attr:`mask_given_frames` the loss mask ``[B, 1, F, 1, 1]`` is 0 on the latent frames whose 4
        mask channels in ``y`` are all 1 (:func:`i2v_mask`: frame 0), when there is more than one."""
        y = batch["y"].to(device=x0.device, dtype=torch.float32)
        if not self.mask_given_frames or x0.shape[2] < 2:
            return TrainingInputs(x_t, timestep, y=y)
        given = y[:, :4, :, :1, :1].amin(dim=1, keepdim=True) > 0.5  # the mask is constant in space
        return TrainingInputs(x_t, timestep, y=y, loss_mask=(~given).to(torch.float32))

    def image_pixels(self, task, image, max_area):
        """:func:`i2v_size` at ``max_area`` (the image's aspect ratio), :func:`i2v_image` resize."""
        h, w = i2v_size(image.width, image.height, max_area, task.vae_stride[1], task.patch_size[1])
        return i2v_image(image, h, w), (h, w)

    def encode_image(self, vae, pixels, frames, device, clip=None, image=None, end_image=None, control=None):
        """``y`` ``[20, T, h, w]``: the image as frame 0 of ``frames`` pixel frames (:func:`i2v_y`)."""
        _, h, w = pixels.shape
        video = torch.cat([pixels[:, None], torch.zeros(3, frames - 1, h, w)], dim=1)
        return ImageInputs(y=i2v_y(vae, video[None], self.known_frames)[0].to(device, torch.float32))


def clip_features(clip, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """CLIP features of one sample's images, concatenated along tokens in the given order.

    Args:
        clip: the CLIP image encoder (:func:`wanlora.models.load_clip`), or ``None``.
        images: ``n`` tensors ``[B, 3, H_i, W_i]`` in [−1, 1] (any sizes; each is resized to 224
            inside): the first frame, then (FLF2V) the last frame.

    Returns:
        ``[B, n·257, 1280]`` float32: ``[first frame's tokens | last frame's tokens]``, the order
        of the official ``clip.visual([first, last])`` that FLF2V's ``emb_pos`` is learned on.

    Raises:
        ValueError: ``clip`` is ``None`` (the message names ``--clip`` and the files it takes).
    """
    if clip is None:
        raise ValueError("this task conditions on CLIP image features: pass the CLIP image encoder with --clip "
                         "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)")
    return torch.cat([clip.encode(x) for x in images], dim=1)


def flf2v_last_frame(end_image, width: int, height: int) -> torch.Tensor:
    """FLF2V's last frame ``[3, height, width]`` in [−1, 1], at the first frame's pixel size.

    ``wan/first_last_frame2video.py`` means to bring a last frame of another size to the first
    frame's: scale by ``max(W / w, H / h)`` (rounded sizes) and center-crop. Its code computes the
    scaled size but only ``center_crop``s the unscaled image to it (with width and height swapped),
    which pads with black instead; this function does what the comment says — PIL bicubic resize
    to cover, center crop — and a last frame of the first frame's size is used as it is.

    Args:
        end_image: PIL image; width, height: the first image's size in pixels.
    """
    from PIL import Image

    if (end_image.width, end_image.height) != (width, height):
        scale = max(width / end_image.width, height / end_image.height)
        img = end_image.convert("RGB").resize((round(end_image.width * scale), round(end_image.height * scale)),
                                              Image.BICUBIC)
        x1, y1 = (img.width - width) // 2, (img.height - height) // 2
        end_image = img.crop((x1, y1, x1 + width, y1 + height))
    return image_to_tensor(end_image)


@dataclass(frozen=True)
class ClipImageToVideo(ImageToVideo):
    """Wan2.1 I2V-14B (``wan/image2video.py`` of Wan2.1): ``y`` as :class:`ImageToVideo` plus the
    CLIP features of the image, ``clip_fea [257, 1280]``, read by the DiT's image cross-attention.

    Generation gives CLIP the input image at its own resolution (not the frame resized for the
    VAE), as the official pipeline does; caching gives it the window's first frame at the
    training size. CLIP resizes either to 224x224, so the two differ only by that resampling.
    """

    kind: ClassVar[str] = "i2v_clip"
    model_type: ClassVar[str] = "i2v"
    cache_keys: ClassVar[tuple[str, ...]] = ("y", "clip_fea")
    label: ClassVar[str] = "I2V conditioning 'y' and CLIP features 'clip_fea'"
    uses_clip: ClassVar[bool] = True

    def cache_tensors(self, vae, videos, clip=None, control=None):
        """``{"y": [B, 20, T, h, w], "clip_fea": [B, 257·n, 1280]}``: ``y`` of the window's known
        frames (:func:`i2v_y`) and the CLIP features of the same frames (:func:`clip_features`)."""
        frames = [videos[:, :, i] for i in _frame_indices(self.known_frames, videos.shape[2])]
        fea = clip_features(clip, frames)
        return {"y": i2v_y(vae, videos, self.known_frames), "clip_fea": fea}

    def training_inputs(self, batch, x0, x_t, timestep, generator):
        """The cached ``y`` and ``clip_fea`` in float32 on ``x0``'s device."""
        inputs = super().training_inputs(batch, x0, x_t, timestep, generator)
        inputs.clip_fea = batch["clip_fea"].to(device=x0.device, dtype=torch.float32)
        return inputs

    def encode_image(self, vae, pixels, frames, device, clip=None, image=None, end_image=None, control=None):
        """``y`` ``[20, T, h, w]`` (as I2V-A14B) and ``clip_fea`` ``[257, 1280]`` of ``image``."""
        fea = clip_features(clip, [image_to_tensor(image)[None]])
        inputs = super().encode_image(vae, pixels, frames, device)
        inputs.clip_fea = fea[0].to(device, torch.float32)
        return inputs


@dataclass(frozen=True)
class FirstLastFrameToVideo(ClipImageToVideo):
    """Wan2.1 FLF2V-14B (``wan/first_last_frame2video.py``): the mask marks the first and the last
    pixel frame, ``y`` encodes ``[first, zeros, last]``, ``clip_fea`` ``[2·257, 1280]`` holds the
    first frame's tokens then the last frame's. The last frame is brought to the first frame's size
    by :func:`flf2v_last_frame`, then resized with the first frame to the output size (bicubic, no
    antialias, as the official code)."""

    kind: ClassVar[str] = "flf2v"
    model_type: ClassVar[str] = "flf2v"
    label: ClassVar[str] = "FLF2V conditioning 'y' and CLIP features 'clip_fea' of the first and last frame"
    requires_end_image: ClassVar[bool] = True
    known_frames: tuple[int, ...] = (0, -1)

    def encode_image(self, vae, pixels, frames, device, clip=None, image=None, end_image=None, control=None):
        """``y`` ``[20, T, h, w]`` of ``[first, zeros, last]`` and ``clip_fea`` ``[514, 1280]``.

        Raises:
            ValueError: no ``end_image`` (the message names ``--end_image_path`` / ``--ei``), or
                fewer than 2 frames.
        """
        if end_image is None:
            raise ValueError("flf2v-14B generates from a first and a last frame: give --end_image_path "
                             "(or --ei in a prompt file)")
        if frames < 2:
            raise ValueError("flf2v-14B needs at least 5 frames (the first and the last are given)")
        first = image_to_tensor(image)
        last = flf2v_last_frame(end_image, image.width, image.height)
        fea = clip_features(clip, [first[None], last[None]])
        _, h, w = pixels.shape
        last_px = F.interpolate(last[None], size=(h, w), mode="bicubic")[0]
        video = torch.cat([pixels[:, None], torch.zeros(3, frames - 2, h, w), last_px[:, None]], dim=1)
        y = i2v_y(vae, video[None], self.known_frames)[0]
        return ImageInputs(y=y.to(device, torch.float32), clip_fea=fea[0].to(device, torch.float32))


@dataclass(frozen=True)
class FirstFrameLatent(Conditioning):
    """TI2V-5B (§6): with an image, latent frame 0 is the clean image latent at timestep 0.

    Attributes:
        first_frame_prob: training only (``--ti2v_first_frame``): the probability per sample that
            latent frame 0 is given clean (and left out of the loss); 0 trains text-to-video.
    """

    kind: ClassVar[str] = "ti2v"
    model_type: ClassVar[str] = "ti2v"
    image_input: ClassVar[str] = "optional"
    label: ClassVar[str] = "first-frame conditioning"
    trains_first_frame: ClassVar[bool] = True
    first_frame_note: ClassVar[str] = ""
    first_frame_prob: float = 0.0

    def training_inputs(self, batch, x0, x_t, timestep, generator):
        """With ``first_frame_prob`` > 0 and more than one latent frame (an image trains as
        text-to-image), one uniform draw per sample picks the samples given a clean frame 0
        (:func:`clean_first_frame`)."""
        b, f = x0.shape[0], x0.shape[2]
        if self.first_frame_prob > 0 and f > 1:
            chosen = torch.rand(b, generator=generator) < self.first_frame_prob  # drawn and tested on the host
            if bool(chosen.any()):
                x_t, timestep, keep = clean_first_frame(x0, x_t, timestep, to_device(chosen, x0.device))
                return TrainingInputs(x_t, timestep, loss_mask=keep)
        return TrainingInputs(x_t, timestep)

    def image_pixels(self, task, image, max_area):
        """:func:`ti2v_image`: best output size in units of 32 px, LANCZOS resize, center crop."""
        pixels, (h, w) = ti2v_image(image, max_area, task.pixel_unit)
        return pixels, (h, w)

    def encode_image(self, vae, pixels, frames, device, clip=None, image=None, end_image=None, control=None):
        """The clean first latent ``[48, 1, h, w]`` of the image alone."""
        return ImageInputs(first_latent=vae.encode(pixels[:, None][None])[0].to(device, torch.float32))

    def model_timestep(self, t, frames, first_latent, device):
        """``[1, T]`` float (the official per-token tensor is constant within a latent frame, §6.3),
        frame 0 at 0 when the first latent is given; text-to-video on the 5B model builds the same
        tensor with every entry ``t`` (``WanTI2V.t2v``)."""
        tt = torch.full((1, frames), float(t), device=device)
        if first_latent:
            tt[:, 0] = 0.0
        return tt


# ----------------------------------------------------------------------------------------------
# Wan2.1-Fun-Control (VideoX-Fun ``videox_fun/pipeline/pipeline_wan_fun_control.py``;
# musubi-tuner ``wan_train_network.py``)

#: The CLIP features a Fun-Control model gets when no image is given: zeros of the official CLIP
#: output shape ``[257, 1280]`` (VideoX-Fun encodes a black image and zeroes the result).
BLANK_CLIP_SHAPE = (257, 1280)


def fun_control_y(control: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """The Fun-Control conditioning ``y`` ``[B, 32, T, h, w]`` concatenated after the noisy latent.

    ``concat([control, start_in])`` on channels: the 16-channel VAE latent of the control video,
    then ``start_in``, zeros except latent frame 0 = the start image's latent (VideoX-Fun's
    ``start_image_latentes_conv_in``). With one latent frame (an image) or no start image,
    ``start_in`` is all zeros, as in the VideoX-Fun pipeline (``if latents.size()[2] != 1``). The
    DiT input is then ``[x 16 | control 16 | start 16]`` = 48 channels.

    Args:
        control: ``[B, 16, T, h, w]`` control-video latents (normalized, as ``vae.encode``).
        start: ``[B, 16, 1, h, w]`` latent of the start image encoded alone, or ``None``.
    """
    start_in = torch.zeros_like(control)
    if start is not None and control.shape[2] > 1:
        start_in[:, :, :1] = start.to(control)
    return torch.cat([control, start_in], dim=1)


def blank_clip_features(batch: int, device=None) -> torch.Tensor:
    """Zero CLIP features ``[batch, 257, 1280]`` float32: a Fun-Control model without an image."""
    return torch.zeros(batch, *BLANK_CLIP_SHAPE, device=device)


def control_pixels(path, frames: int, height: int, width: int) -> torch.Tensor:
    """The control video of generation, ``[3, frames, height, width]`` float32 in [−1, 1].

    Its first ``frames`` frames, each resized to cover ``width x height`` and center-cropped
    (as the dataset's frames; musubi-tuner's ``load_video(path, 0, frames, bucket_reso)``). The
    control video is read frame by frame, without frame-rate resampling: give it at the task's
    frame rate (16 fps).

    Args:
        path: a video file or a folder of frame images (sorted by name, numbers in natural order).

    Raises:
        ValueError: no path, or a clip shorter than ``frames`` (the message names the file and the
            fix); ``wanlora.video_io.MediaError`` (a ValueError) for an unreadable file.
    """
    from wanlora.video_io import probe_video, read_video_frames

    if path is None:
        raise ValueError("this Fun-Control task generates from a control video: give --control_path "
                         "(a video file or a folder of frames; --cn in a prompt file)")
    info = probe_video(path)
    if info.frame_count < frames:
        raise ValueError(f"{path}: the control video has {info.frame_count} frames but {frames} are generated; "
                         f"give a longer control video or a --video_length of at most {info.frame_count}")
    return frames_to_video(read_video_frames(path, range(frames), size=(width, height), info=info))


@dataclass(frozen=True)
class FunControl(Conditioning):
    """Wan2.1-Fun-Control text-to-video (``t2v-1.3B-FC``, ``t2v-14B-FC``): the control video's
    latents beside the noisy latent (:func:`fun_control_y`, no start image) and zero CLIP features
    (:func:`blank_clip_features`; the model has the CLIP branch, VideoX-Fun ``model_type "i2v"``).

    The cache holds ``latents_control`` ``[16, T, h, w]``, the VAE latent of the control clip's
    frames at the window's frame numbers (musubi-tuner's cache key).
    """

    kind: ClassVar[str] = "fun_control"
    model_type: ClassVar[str] = "i2v"
    cache_keys: ClassVar[tuple[str, ...]] = ("latents_control",)
    label: ClassVar[str] = "Fun-Control control latents 'latents_control'"
    uses_control: ClassVar[bool] = True
    first_frame_note: ClassVar[str] = "conditions on a control video"

    def cache_tensors(self, vae, videos, clip=None, control=None):
        """``{"latents_control": [B, 16, T, h, w]}``: ``vae.encode(control)``.

        Raises:
            ValueError: no control videos, or of another shape than ``videos``.
        """
        if control is None or control.shape != videos.shape:
            raise ValueError(f"{self.kind}: the control videos must have the target's shape {tuple(videos.shape)}, "
                             f"got {None if control is None else tuple(control.shape)}")
        return {"latents_control": vae.encode(control).float()}

    def _start(self, batch, device):
        return None

    def _clip(self, batch, b, device):
        return blank_clip_features(b, device)

    def training_inputs(self, batch, x0, x_t, timestep, generator):
        """``y`` = :func:`fun_control_y` of the cached control latents (and start latent), and the
        CLIP features, in float32 on ``x0``'s device."""
        control = batch["latents_control"].to(device=x0.device, dtype=torch.float32)
        y = fun_control_y(control, self._start(batch, x0.device))
        return TrainingInputs(x_t, timestep, y=y, clip_fea=self._clip(batch, x0.shape[0], x0.device))

    def encode_image(self, vae, pixels, frames, device, clip=None, image=None, end_image=None, control=None):
        """``y`` ``[32, T, h, w]`` from the control video ``[3, F, H, W]``, ``clip_fea`` zeros."""
        if control is None:
            raise ValueError("this Fun-Control task generates from a control video: give --control_path")
        y = fun_control_y(vae.encode(control[None]).float())
        return ImageInputs(y=y[0].to(device, torch.float32), clip_fea=blank_clip_features(1, device)[0])


@dataclass(frozen=True)
class FunControlImage(FunControl):
    """Wan2.1-Fun-Control image-to-video (``i2v-14B-FC``): as :class:`FunControl`, plus the start
    image: its latent in latent frame 0 of the second half of ``y`` and its CLIP features.

    The cache adds ``start_latent`` ``[16, 1, h, w]`` (the VAE latent of the window's first frame
    encoded alone, as VideoX-Fun encodes the start image; equal to latent frame 0 of the I2V
    ``y`` musubi-tuner takes it from, the VAE being causal) and ``clip_fea`` ``[257, 1280]`` of the
    same frame. Generation sizes and resizes the image as ``i2v-14B`` (:func:`i2v_size`) and gives
    CLIP the image at its own resolution.
    """

    kind: ClassVar[str] = "fun_control_i2v"
    image_input: ClassVar[str] = "required"
    cache_keys: ClassVar[tuple[str, ...]] = ("latents_control", "start_latent", "clip_fea")
    label: ClassVar[str] = "Fun-Control control latents, start-image latent and CLIP features"
    uses_clip: ClassVar[bool] = True

    def cache_tensors(self, vae, videos, clip=None, control=None):
        """``latents_control`` (:class:`FunControl`), ``start_latent`` ``[B, 16, 1, h, w]`` and
        ``clip_fea`` ``[B, 257, 1280]`` of each window's first frame."""
        out = super().cache_tensors(vae, videos, clip, control)
        out["clip_fea"] = clip_features(clip, [videos[:, :, 0]])
        out["start_latent"] = vae.encode(videos[:, :, :1]).float()
        return out

    def _start(self, batch, device):
        return batch["start_latent"].to(device=device, dtype=torch.float32)

    def _clip(self, batch, b, device):
        return batch["clip_fea"].to(device=device, dtype=torch.float32)

    def image_pixels(self, task, image, max_area):
        """As ``i2v-14B``: :func:`i2v_size` at ``max_area``, :func:`i2v_image` resize."""
        h, w = i2v_size(image.width, image.height, max_area, task.vae_stride[1], task.patch_size[1])
        return i2v_image(image, h, w), (h, w)

    def encode_image(self, vae, pixels, frames, device, clip=None, image=None, end_image=None, control=None):
        """``y`` ``[32, T, h, w]`` (control latents, start latent in frame 0) and ``clip_fea``
        ``[257, 1280]`` of ``image``."""
        if control is None:
            raise ValueError("this Fun-Control task generates from a control video: give --control_path")
        fea = clip_features(clip, [image_to_tensor(image)[None]])
        start = vae.encode(pixels[:, None][None]).float()
        y = fun_control_y(vae.encode(control[None]).float(), start)
        return ImageInputs(y=y[0].to(device, torch.float32), clip_fea=fea[0].to(device, torch.float32))


#: conditioning kind (``Task.conditioning``) -> class; the one place a kind's name is looked up.
KINDS: dict[str, type[Conditioning]] = {
    c.kind: c for c in (TextToVideo, ImageToVideo, ClipImageToVideo, FirstLastFrameToVideo, FirstFrameLatent,
                        FunControl, FunControlImage)}


def conditioning_for(task: str | Task, first_frame_prob: float = 0.0, mask_given_frames: bool = False) -> Conditioning:
    """The conditioning of ``task`` (a ``--task`` name or :class:`Task`), chosen from the task table.

    Args:
        first_frame_prob: ``--ti2v_first_frame`` (training): probability in [0, 1] that a sample's
            first latent frame is given clean; only for a conditioning that trains it (TI2V-5B).
        mask_given_frames: ``--i2v_mask_first_frame`` (training): leave the frames ``y`` gives out
            of the loss; only for the I2V conditionings (:class:`ImageToVideo` and its subclasses).

    Raises:
        ValueError: an unknown task, a probability outside [0, 1], or a probability > 0 for a task
            whose conditioning does not train a first frame, or ``mask_given_frames`` for a task
            without ``y`` (each message names the tasks that take it).
    """
    task = get_task(task)
    cls = KINDS[task.conditioning]
    p = float(first_frame_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"--ti2v_first_frame {first_frame_prob}: a probability in [0, 1]")
    if mask_given_frames:
        if not issubclass(cls, ImageToVideo):
            fits = ", ".join(t.name for t in TASKS.values() if issubclass(KINDS[t.conditioning], ImageToVideo))
            raise ValueError(f"--i2v_mask_first_frame is for --task {fits} (their first frame is given by y); "
                             f"{task.name} has no y" + (": use --ti2v_first_frame" if cls.trains_first_frame else ""))
    kw = {"mask_given_frames": True} if mask_given_frames else {}
    if p == 0.0:
        return cls(**kw)
    if not cls.trains_first_frame:
        fits = ", ".join(t.name for t in TASKS.values() if KINDS[t.conditioning].trains_first_frame)
        raise ValueError(f"--ti2v_first_frame is for --task {fits}; {task.name} {cls.first_frame_note}")
    return cls(first_frame_prob=p)
