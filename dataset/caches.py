"""Cache files: names, metadata, and whether a cache is up to date.

Latent cache, one per item and frame window, in the entry's ``cache_directory``::

    {stem}_{start:05d}-{frames:03d}_{W}x{H}_{vae}.safetensors      e.g. dance_00000-017_96x64_wan21.safetensors

``start`` is the window's first position in the (resampled) frame sequence, ``frames`` its pixel
frame count (4n+1; images: ``00000-001``), ``W x H`` the bucket in pixels, ``vae`` ``wan21`` or
``wan22``. Tensors: ``latents`` float32 ``[C, T, h, w]`` (normalized VAE latents,
``T = (frames-1)/4 + 1``, ``h = H/stride``, ``w = W/stride``); for ``i2v`` tasks also ``y``
float32 ``[20, T, h, w]`` = concat(mask 4, image latent 16) as ``wan/image2video.py`` builds it;
for the Wan2.1 image tasks ``clip_fea`` float32 ``[257·n, 1280]``; for the Fun-Control tasks
``latents_control`` float32 ``[16, T, h, w]`` (the control clip's frames at the window's frame
numbers, same bucket) and for ``i2v-14B-FC`` also ``start_latent`` ``[16, 1, h, w]`` (the window's
first frame encoded alone) and ``clip_fea`` ``[257, 1280]``.

Text cache, one per item: ``{stem}_wan_te.safetensors`` with ``context`` float32 ``[L, d_model]``
(umT5 output trimmed to the caption's tokens).

Metadata (safetensors header, all strings) is listed in :data:`LATENT_META_KEYS` /
:data:`TEXT_META_KEYS`; the ``*_CONTENT_KEYS`` decide whether a cache is current: a cache whose
recorded source file (path, size, mtime), frame numbers, pixel size, VAE identity or
conditioning differ from what the dataset asks now is stale and rebuilt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

__all__ = [
    "LATENT_FORMAT",
    "TEXT_FORMAT",
    "LATENT_META_KEYS",
    "TEXT_META_KEYS",
    "LATENT_CONTENT_KEYS",
    "TEXT_CONTENT_KEYS",
    "vae_tag",
    "latent_cache_name",
    "parse_latent_cache_name",
    "text_cache_name",
    "read_cache_metadata",
    "stale_reason",
    "source_identity",
    "latent_caches_in",
    "dumps",
]

LATENT_FORMAT = "wanlora.latent_cache.v1"
TEXT_FORMAT = "wanlora.text_cache.v1"
TEXT_SUFFIX = "_wan_te.safetensors"

#: Latent cache metadata: format, source (absolute path), source_size (bytes), source_mtime_ns,
#: window_start, window_frames, frame_indices (JSON list of the file's frame numbers), source_fps
#: (the resampling asked, or ""), width, height (pixels), vae (identity), vae_kind, task,
#: conditioning (none|i2v|i2v_clip|flf2v|ti2v), has_y ("1"/"0"), dataset (entry name), config
#: (TOML path), options (JSON of the entry's shaping options). The Wan2.1 image tasks add
#: has_clip_fea and clip (the CLIP encoder's identity), which the content check compares. Entries
#: with ``mask_directory`` add has_mask and mask (the mask file's identity as JSON, or "none"), also
#: compared; the tensor ``mask`` float32 [1, T, h, w] holds the loss weights (wanlora.dataset.masks).
#: The Fun-Control tasks add has_latents_control (and has_start_latent, has_clip_fea for i2v-14B-FC)
#: and control (JSON of the control clip's source, source_size, source_mtime_ns), compared too.
LATENT_META_KEYS = (
    "format", "source", "source_size", "source_mtime_ns", "window_start", "window_frames",
    "frame_indices", "source_fps", "width", "height", "vae", "vae_kind", "task", "conditioning",
    "has_y", "dataset", "config", "options",
)
LATENT_CONTENT_KEYS = (
    "format", "source", "source_size", "source_mtime_ns", "frame_indices", "width", "height",
    "vae", "has_y", "clip", "mask", "control",
)
#: Text cache metadata: format, caption, text_encoder (identity), source (media path), dataset.
TEXT_META_KEYS = ("format", "caption", "text_encoder", "source", "dataset")
TEXT_CONTENT_KEYS = ("format", "caption", "text_encoder")

_LATENT_RE = re.compile(r"^(?P<stem>.+)_(?P<start>\d{5,})-(?P<frames>\d{3,})_(?P<w>\d+)x(?P<h>\d+)_(?P<vae>wan2[12])\.safetensors$")


def vae_tag(vae_kind: str) -> str:
    """``"wan2.1"`` -> ``"wan21"``, ``"wan2.2"`` -> ``"wan22"``."""
    return vae_kind.replace(".", "")


def latent_cache_name(stem: str, start: int, frames: int, width: int, height: int, vae_kind: str) -> str:
    """File name of a latent cache (see the module docstring)."""
    return f"{stem}_{start:05d}-{frames:03d}_{width}x{height}_{vae_tag(vae_kind)}.safetensors"


def parse_latent_cache_name(name: str) -> dict[str, Any] | None:
    """Inverse of :func:`latent_cache_name`: ``{stem, start, frames, width, height, vae}`` or None."""
    m = _LATENT_RE.match(name)
    if not m:
        return None
    return {"stem": m["stem"], "start": int(m["start"]), "frames": int(m["frames"]),
            "width": int(m["w"]), "height": int(m["h"]), "vae": m["vae"]}


def text_cache_name(stem: str) -> str:
    """File name of a text cache: ``{stem}_wan_te.safetensors``."""
    return stem + TEXT_SUFFIX


def latent_caches_in(folder: Path, vae_kind: str) -> dict[str, list[Path]]:
    """Latent caches of one VAE kind in a folder, grouped by stem (sorted)."""
    out: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out
    tag = vae_tag(vae_kind)
    for p in sorted(folder.iterdir()):
        info = parse_latent_cache_name(p.name)
        if info and info["vae"] == tag:
            out.setdefault(info["stem"], []).append(p)
    return out


def read_cache_metadata(path: str | Path) -> dict[str, str] | None:
    """The safetensors header metadata of a cache, or ``None`` if the file is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not a valid cache"
        return None


def source_identity(path: Path) -> dict[str, str]:
    """``source``, ``source_size``, ``source_mtime_ns`` of a media file (a folder: its newest file)."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        mtime = max((p.stat().st_mtime_ns for p in files), default=path.stat().st_mtime_ns)
    else:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return {"source": str(path), "source_size": str(size), "source_mtime_ns": str(mtime)}


def stale_reason(path: Path, expected: dict[str, str], keys: tuple[str, ...]) -> str | None:
    """Why the cache at ``path`` does not match ``expected`` on ``keys``; ``None`` when current."""
    if not path.exists():
        return "missing"
    meta = read_cache_metadata(path)
    if meta is None:
        return "unreadable"
    for k in keys:
        if meta.get(k) != expected.get(k):
            old, new = meta.get(k), expected.get(k)
            if k == "frame_indices":
                return "frame window changed"
            return f"{k} changed ({old!r} -> {new!r})"
    return None


def dumps(obj: Any) -> str:
    """Compact JSON for metadata values."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
