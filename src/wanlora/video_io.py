"""Reading and writing media: videos with PyAV, images with Pillow.

Reading (used by ``wanlora-cache-latents``):

* :func:`probe_video` demuxes a video (no decoding) and returns its size as displayed, its exact
  frame count and every frame's presentation time, so frame windows and frame-rate resampling are
  planned before any pixel is decoded. A folder of images counts as a video (frames in natural
  sort order: ``f2.png`` before ``f10.png``).
* :func:`read_video_frames` decodes only the frames asked for, seeking to the keyframe before the
  first one, with FFmpeg threads; any codec FFmpeg reads works. The display rotation of phone
  clips is honored. Frames can be resized to cover a bucket and center-cropped on the way
  (antialiased: FFmpeg's area filter when shrinking, bicubic when enlarging).
* :func:`read_image` opens an image as RGB the way it is displayed: EXIF orientation applied,
  transparency (RGBA, LA, P with a transparent index) composited onto white, grayscale / CMYK /
  16-bit converted.

Writing (used by ``--debug_mode`` and by generation): :func:`write_video` (H.264 MP4, yuv420p,
atomic) and :func:`write_images` (one PNG per frame, atomic).

Errors are :class:`MediaError` (a ``ValueError``) naming the file and what is wrong with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from wanlora.io_utils import atomic_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "MediaError",
    "VideoInfo",
    "probe_video",
    "read_video_frames",
    "read_image",
    "image_size",
    "resize_cover_crop",
    "cover_geometry",
    "to_uint8_frames",
    "write_video",
    "write_images",
    "frame_folder_files",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class MediaError(ValueError):
    """A media file cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns without decoding.

    Attributes:
        path: the file (or folder of frames).
        width, height: size in pixels as displayed (after the rotation metadata).
        frame_count: exact number of frames (counted from the demuxed packets).
        fps: the stream's average frame rate (``None`` for a folder of frames).
        timestamps: presentation time of every frame in seconds from the first one, ascending;
            a folder of frames gets ``0, 1, 2, ...`` (frame numbers; scale by 1/fps yourself).
        rotation: counter-clockwise display rotation in degrees (0, 90, 180, 270).
        is_folder: the "video" is a folder of images.
    """

    path: Path
    width: int
    height: int
    frame_count: int
    fps: float | None
    timestamps: tuple[float, ...] = field(repr=False)
    rotation: int = 0
    is_folder: bool = False
    pts: tuple[int, ...] = field(default=(), repr=False)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_folder_files(folder: str | Path) -> list[Path]:
    """Image files of a folder-of-frames video, in natural sort order."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _open(path: Path):
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: cannot be opened as a video: {_why(e)} (the file is truncated, damaged "
                         "or not a video)") from None


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
    return text.replace("\n", " ")


def _rotation_of(first_frame_rotation: int | float | None) -> int:
    """Counter-clockwise display rotation in degrees, snapped to 0/90/180/270."""
    rot = first_frame_rotation or 0
    return int(round(rot / 90.0)) % 4 * 90


def probe_video(path: str | Path) -> VideoInfo:
    """Demux a video (or list a folder of frames) and return its :class:`VideoInfo`.

    The frame count and timestamps come from the packets' presentation times (sorted, since
    B-frames arrive out of order), which is exact for constant and variable frame rates alike.
    The first frame is decoded to read the display rotation and to prove the stream decodes.

    Raises:
        MediaError: missing or empty file, not a video, no video stream, no decodable frame.
    """
    import av

    path = Path(path)
    if path.is_dir():
        files = frame_folder_files(path)
        if not files:
            raise MediaError(f"{path}: folder of frames holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        w, h = image_size(files[0])
        return VideoInfo(path, w, h, len(files), None, tuple(float(i) for i in range(len(files))), 0, True, ())
    if not path.exists():
        raise MediaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: file is empty (0 bytes)")
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream in the file")
        stream = container.streams.video[0]
        tb = stream.time_base or Fraction(1, 1)
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                pts.append(packet.pts)
        except av.error.FFmpegError as e:
            if not pts:
                raise MediaError(f"{path}: cannot be demuxed ({_why(e)})") from None
        if not pts:
            raise MediaError(f"{path}: the video stream holds no frames (truncated or not a video)")
        pts.sort()
        container.seek(0)
        try:
            first = next(container.decode(stream))
        except (StopIteration, av.error.FFmpegError) as e:
            raise MediaError(f"{path}: no frame could be decoded ({_why(e)})") from None
        rotation = _rotation_of(first.rotation)
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        t0 = pts[0]
        times = tuple(float((p - t0) * tb) for p in pts)
    return VideoInfo(path, w, h, len(pts), fps, times, rotation, False, tuple(pts))


def cover_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """Resize-to-cover geometry: ``(resized_w, resized_h, left, top)``.

    The source is scaled by ``max(dst_w/src_w, dst_h/src_h)`` (rounded, never below the target)
    so it covers ``dst``; ``(left, top)`` is the offset of the centered ``dst_w x dst_h`` crop.
    """
    scale = max(dst_w / src_w, dst_h / src_h)
    rw = max(dst_w, int(round(src_w * scale)))
    rh = max(dst_h, int(round(src_h * scale)))
    return rw, rh, (rw - dst_w) // 2, (rh - dst_h) // 2


def resize_cover_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a PIL image to cover ``size`` = (W, H) (Lanczos, antialiased) and center-crop it."""
    dst_w, dst_h = size
    rw, rh, left, top = cover_geometry(image.width, image.height, dst_w, dst_h)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.LANCZOS, reducing_gap=3.0)
    if (rw, rh) != (dst_w, dst_h):
        image = image.crop((left, top, left + dst_w, top + dst_h))
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """Displayed (W, H) of an image without decoding its pixels (EXIF rotation applied)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise MediaError(f"{path}: cannot be read as an image ({_why(e)})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_image(path: str | Path) -> Image.Image:
    """Open an image as a displayed RGB PIL image.

    EXIF orientation is applied; images with transparency (RGBA, LA, P or L with a transparent
    color) are composited onto white; grayscale, CMYK, 16-bit and palette images are converted.

    Raises:
        MediaError: not found, empty or not an image.
    """
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("L", "RGB") and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise MediaError(f"{path}: cannot be read as an image ({_why(e)})") from None


def read_video_frames(
    path: str | Path,
    indices: Sequence[int],
    size: tuple[int, int] | None = None,
    info: VideoInfo | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Decode the frames at ``indices`` (positions in presentation order) of a video.

    Args:
        path: video file or folder of frames.
        indices: frame numbers ``0..frame_count-1``; any order, repeats allowed.
        size: ``(W, H)`` to resize-to-cover and center-crop each frame to; ``None`` keeps the
            displayed size.
        info: the :func:`probe_video` result, when already known.
        threads: FFmpeg decoding threads (0 = FFmpeg's choice).

    Returns:
        uint8 array ``[len(indices), H, W, 3]`` (RGB, displayed orientation).

    Raises:
        MediaError: unreadable file, or an index past the frames that decode (truncated file).
    """
    import av

    path = Path(path)
    info = info or probe_video(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_video_frames: no frame indices given")
    bad = [i for i in indices if i < 0 or i >= info.frame_count]
    if bad:
        raise MediaError(f"{path}: frame {bad[0]} asked but the video has {info.frame_count} frames")
    out_w, out_h = size if size is not None else (info.width, info.height)
    wanted: dict[int, list[int]] = {}
    for pos, i in enumerate(indices):
        wanted.setdefault(i, []).append(pos)
    result = np.empty((len(indices), out_h, out_w, 3), dtype=np.uint8)

    if info.is_folder:
        files = frame_folder_files(path)
        for i, positions in wanted.items():
            im = read_image(files[i])
            if size is not None:
                im = resize_cover_crop(im, size)
            elif im.size != (out_w, out_h):
                raise MediaError(f"{files[i]}: frame size {im.size} differs from the first frame's {(out_w, out_h)}")
            arr = np.asarray(im)
            for pos in positions:
                result[pos] = arr
        return result

    first, last = min(wanted), max(wanted)
    rw, rh, left, top = cover_geometry(info.width, info.height, out_w, out_h)
    quarter_turns = info.rotation // 90
    coded_w, coded_h = (rh, rw) if quarter_turns % 2 else (rw, rh)
    shrink = rw * rh < info.width * info.height
    interpolation = "AREA" if shrink else "BICUBIC"

    def convert(frame) -> np.ndarray:
        if (frame.width, frame.height) != (coded_w, coded_h):
            frame = frame.reformat(coded_w, coded_h, "rgb24", interpolation=interpolation)
        arr = frame.to_ndarray(format="rgb24")
        if quarter_turns:
            arr = np.rot90(arr, quarter_turns)
        return arr[top : top + out_h, left : left + out_w]

    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        pts_of = list(info.pts)  # presentation times in stream units, frame number -> pts
        index_of = {p: i for i, p in enumerate(pts_of)}
        pts_sorted = np.asarray(pts_of)
        container.seek(pts_of[first] if first > 0 else 0, stream=stream, backward=True, any_frame=False)
        found: set[int] = set()
        counter = None  # fall back to counting frames when pts are absent
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.pts in index_of:
                    i = index_of[frame.pts]
                elif frame.pts is not None:
                    # Nearest timestamp (rounding of odd time bases).
                    j = int(np.searchsorted(pts_sorted, frame.pts))
                    near = [c for c in (j - 1, j) if 0 <= c < len(pts_sorted)]
                    i = min(near, key=lambda c: abs(pts_sorted[c] - frame.pts))
                else:
                    counter = 0 if counter is None else counter + 1
                    i = counter
                if i > last:
                    break
                if i in wanted and i not in found:
                    arr = convert(frame)
                    for pos in wanted[i]:
                        result[pos] = arr
                    found.add(i)
                    if len(found) == len(wanted):
                        break
        except av.error.FFmpegError as e:
            missing = sorted(set(wanted) - found)
            raise MediaError(f"{path}: decoding failed before frame {missing[0]} ({_why(e)})") from None
    missing = sorted(set(wanted) - found)
    if missing:
        raise MediaError(
            f"{path}: frames {missing[0]}..{missing[-1]} could not be decoded "
            f"({len(missing)} of {len(wanted)} asked; the file is probably truncated)"
        )
    return result


def to_uint8_frames(frames) -> np.ndarray:
    """Frames as uint8 ``[F, H, W, 3]``.

    Accepts uint8 ``[F, H, W, 3]`` (array or tensor) or float ``[3, F, H, W]`` in [-1, 1] (the
    VAE's pixel layout, also ``[1, 3, F, H, W]``; values are clamped and rounded).
    """
    import torch

    if isinstance(frames, torch.Tensor):
        if frames.ndim == 5 and frames.shape[0] == 1:  # a batch of one [1, 3, F, H, W]
            frames = frames[0]
        if frames.dtype == torch.uint8:
            frames = frames.cpu().numpy()
        else:
            if frames.ndim != 4 or frames.shape[0] != 3:
                raise ValueError(f"float frames must be [3, F, H, W] in [-1, 1], got {tuple(frames.shape)}")
            x = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            frames = x.permute(1, 2, 3, 0).numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        if frames.ndim == 4 and frames.shape[0] == 3:
            frames = np.clip((frames.astype(np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
            frames = frames.transpose(1, 2, 3, 0)
        else:
            raise ValueError(f"frames must be uint8 [F, H, W, 3] or float [3, F, H, W], got {frames.dtype} {frames.shape}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {frames.shape}")
    return np.ascontiguousarray(frames)


def write_video(path: str | Path, frames, fps: float, metadata: dict[str, str] | None = None, crf: int = 18) -> Path:
    """Write frames as an H.264 MP4 (yuv420p), atomically.

    Args:
        path: destination ``.mp4``.
        frames: uint8 ``[F, H, W, 3]`` or float ``[3, F, H, W]`` in [-1, 1].
        fps: frame rate (e.g. the task's 16 or 24).
        metadata: written as container tags (strings; e.g. prompt, seed, LoRA).
        crf: x264 quality (lower is better).

    Odd widths or heights are padded by repeating the last row / column to an even size (yuv420p
    needs even sizes). Returns the path.
    """
    import av

    frames = to_uint8_frames(frames)
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        # use_metadata_tags: the MP4 muxer keeps arbitrary keys (prompt, seed, ...), not only title/comment.
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as container:
            for k, v in (metadata or {}).items():
                container.metadata[str(k)] = str(v)
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for arr in frames:
                frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_images(folder: str | Path, frames, prefix: str = "frame", ext: str = ".png") -> list[Path]:
    """Write each frame as an image ``{folder}/{prefix}_{i:05d}{ext}`` (atomic); returns the paths.

    ``frames``: uint8 ``[F, H, W, 3]`` or float ``[3, F, H, W]`` in [-1, 1].
    """
    frames = to_uint8_frames(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(frames):
        p = folder / f"{prefix}_{i:05d}{ext}"
        with atomic_path(p) as tmp:
            Image.fromarray(arr).save(tmp, format=None if ext.lower() != ".jpg" else "JPEG")
        paths.append(p)
    return paths
