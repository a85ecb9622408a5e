"""Loss masks: per-pixel weights for images and clips, matched by name, cached on the latent grid.

An entry's ``mask_directory`` holds one mask per item, named by the item's stem (the media file
name without extension, as its caption and caches are):

* ``{stem}.png`` (any image extension): one grayscale picture; for a clip, the same mask for every
  frame;
* video entries also ``{stem}.mp4`` (any video extension) or a folder ``{stem}/`` of frames: one
  mask frame per frame of the clip (same frame count), picked with the clip's own frame numbers
  (``source_fps`` resampling and windows included).

The weight of a pixel is the mask's gray level over 255 (0 = not trained, 1 = full weight; a color
file counts by its luma ``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16``, Pillow's ``convert("L")``
(ITU-R 601-2), transparency composited onto white as for images). The mask must have its media's
size, or at least its aspect ratio (within 1 %); it goes through the media's own resize-to-cover and
center crop (:func:`wanlora.video_io.resize_cover_crop` / :func:`wanlora.video_io.read_video_frames`),
so it stays aligned with the trained pixels.

On the latent grid (:func:`latent_mask`) each latent cell gets the **mean** weight of the pixels it
encodes: the Wan VAEs encode frame 0 alone and then groups of 4 frames (latent frame ``k >= 1``
covers pixel frames ``4k-3 .. 4k``), and each latent pixel a ``s x s`` block (``s`` = 8 for the
Wan2.1 VAE, 16 for Wan2.2's). That is ``F.interpolate(mode="area")`` (sd-scripts' masked loss) per
frame group, exact because the bucket sides are multiples of ``s``.

An item without a mask trains with full weight (the caching run warns, naming it); a mask that
cannot be read, or whose size or frame count does not match its media, fails that item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanlora.dataset import caches as C
from wanlora.video_io import (
    IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, image_size, probe_video, read_image, read_video_frames,
    resize_cover_crop,
)

__all__ = ["mask_index", "find_mask", "mask_metadata", "luma", "read_pixel_masks", "latent_mask"]

#: how far a mask's aspect ratio may be from its media's (relative) before it is refused
ASPECT_TOLERANCE = 0.01


def mask_index(mask_directory: Path, kind: str) -> dict[str, list[Path]]:
    """The masks in ``mask_directory`` by stem: image files (both kinds), and for ``kind`` ``"video"``
    also video files and sub-folders holding images. Hidden files are skipped; sorted."""
    out: dict[str, list[Path]] = {}
    for p in sorted(Path(mask_directory).iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if kind == "video" and any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir() if q.is_file()):
                out.setdefault(p.name, []).append(p)
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS or (kind == "video" and ext in VIDEO_EXTENSIONS):
            out.setdefault(p.stem, []).append(p)
    return out


def find_mask(index: dict[str, list[Path]], stem: str, media: Path) -> Path | None:
    """The mask of the item ``stem`` (``media`` names it in messages), or None when it has none.

    Raises:
        MediaError: more than one file or folder answers to the stem.
    """
    found = index.get(stem, [])
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise MediaError(f"{media}: {len(found)} masks answer to '{stem}' in {found[0].parent} ({names}); keep one")
    return found[0] if found else None


def mask_metadata(mask_directory: Path | None, mask: Path | None) -> dict[str, str]:
    """The latent-cache metadata of an item's loss mask: nothing for an entry without
    ``mask_directory`` (its caches stay as they were), else ``has_mask`` (``"1"``/``"0"``) and ``mask``
    (the mask file's identity, path/size/mtime as JSON, or ``"none"``), which the staleness check compares."""
    if mask_directory is None:
        return {}
    return {"has_mask": "1" if mask else "0", "mask": C.dumps(C.source_identity(mask)) if mask else "none"}


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` RGB -> uint8 ``[...]`` gray level, Pillow's ``convert("L")`` (ITU-R 601-2)."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _check_aspect(mask: Path, mask_wh: tuple[int, int], media: Path, media_wh: tuple[int, int]) -> None:
    if mask_wh == media_wh:
        return
    ratio = (mask_wh[0] / mask_wh[1]) / (media_wh[0] / media_wh[1])
    if abs(ratio - 1.0) > ASPECT_TOLERANCE:
        raise MediaError(f"{mask}: mask is {mask_wh[0]}x{mask_wh[1]} but {media.name} is {media_wh[0]}x{media_wh[1]}; "
                         "a mask needs its media's size (or aspect ratio): re-export it at the media's size")


def read_pixel_masks(mask: Path, media: Path, kind: str, windows: list[list[int]], size: tuple[int, int],
                     media_size: tuple[int, int], media_frames: int | None = None) -> list[np.ndarray]:
    """The pixel weights of each window: float32 ``[F, H, W]`` in [0, 1] (``F`` = the window's frames,
    ``(W, H)`` = ``size``, the bucket).

    Args:
        mask: the mask file or folder (:func:`find_mask`); media: the item's media (messages).
        kind: ``"image"`` or ``"video"`` (the entry's).
        windows: per window, the media file's frame numbers (images: ``[[0]]``).
        size: the bucket ``(W, H)`` the media is resized to; media_size: the media's displayed ``(W, H)``.
        media_frames: the clip's frame count (a per-frame mask must have as many).

    Raises:
        MediaError: unreadable mask, another aspect ratio, or a per-frame mask whose frame count
            differs from the clip's; the message names the mask file and the fix.
    """
    mask = Path(mask)
    per_frame = mask.is_dir() or (mask.suffix.lower() in VIDEO_EXTENSIONS and mask.suffix.lower() not in IMAGE_EXTENSIONS)
    if kind == "video" and mask.suffix.lower() == ".gif":  # an animated GIF beside clips is a per-frame mask
        per_frame = probe_video(mask).frame_count > 1
    if not per_frame:
        _check_aspect(mask, image_size(mask), media, media_size)
        w = luma(np.asarray(resize_cover_crop(read_image(mask), size))).astype(np.float32) / 255.0
        return [np.broadcast_to(w, (len(ix), *w.shape)).copy() for ix in windows]
    info = probe_video(mask)
    _check_aspect(mask, (info.width, info.height), media, media_size)
    if media_frames is not None and info.frame_count != media_frames:
        raise MediaError(f"{mask}: mask has {info.frame_count} frames but {media.name} has {media_frames}; a "
                         "per-frame mask needs one frame per frame of its clip (or use one image for all frames)")
    union = sorted({i for ix in windows for i in ix})
    frames = luma(read_video_frames(mask, union, size=size, info=info)).astype(np.float32) / 255.0
    pos = {i: k for k, i in enumerate(union)}
    return [frames[[pos[i] for i in ix]] for ix in windows]


def latent_mask(pixel_mask: np.ndarray | torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """Pixel weights ``[F, H, W]`` -> latent-grid weights float32 ``[1, T, H/s, W/s]``, each cell the
    mean of the pixels it encodes (module docstring): latent frame 0 = pixel frame 0, latent frame
    ``k >= 1`` = pixel frames ``4k-3 .. 4k``; spatial ``s x s`` blocks.

    Args:
        pixel_mask: weights in [0, 1], ``F = 4n+1`` frames, ``H`` and ``W`` multiples of ``s``.
        stride: the VAE's ``(time, height, width)`` compression, ``Task.vae_stride`` ((4, 8, 8) or (4, 16, 16)).
    Raises:
        ValueError: a frame count or side that the VAE's stride does not divide.
    """
    m = torch.as_tensor(np.asarray(pixel_mask, dtype=np.float32))
    st, sh, sw = stride
    f, h, w = m.shape
    if (f - 1) % st or h % sh or w % sw:
        raise ValueError(f"latent_mask: {f} frames of {w}x{h} px do not fit the VAE stride {stride} "
                         f"(frames {st}n+1, sides multiples of {sh})")
    groups = torch.cat([m[:1], m[1:].reshape((f - 1) // st, st, h, w).mean(dim=1)]) if f > 1 else m
    cells = groups.reshape(groups.shape[0], h // sh, sh, w // sw, sw).mean(dim=(2, 4))
    return cells.unsqueeze(0).contiguous()
