"""Spatially tiled VAE decoding with blended overlaps, so a large frame fits a small GPU budget.

The latent grid is cut into overlapping tiles; each tile is decoded on its own (streaming through
time as usual), and the decoded tiles are averaged with weights that ramp linearly across each
overlap and are zero in a ``margin`` next to every cut edge (the pixels that saw the zero padding
of the cut). Peak activation memory follows the tile size, not the frame size.

Seam tolerance. A tile's pixels differ from the untiled decode only through (a) the convolutions'
zero padding at the cut, which reaches ``R`` pixels into the tile (the decoder's receptive radius),
and (b) the decoder's middle attention block, which attends within a tile instead of the whole
frame. For a decoder without (b) (attention output projection zero, the official init) and
``margin >= R``, tiled equals untiled to float rounding (tested, relative error < 1e-5). With
real weights (b) and the part of (a) past the margin leave a small, smooth difference spread over
the overlap; the defaults (256 px tiles, 64 px overlap) follow common practice for this VAE family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Tiling", "as_tiling", "tile_starts", "tiled_decode"]


@dataclass(frozen=True)
class Tiling:
    """Tile layout for :func:`tiled_decode`, in pixels.

    Attributes:
        tile: tile side (a multiple of the VAE's spatial stride, 8 or 16).
        overlap: overlap of neighbouring tiles (a multiple of the stride, ``< tile``).
        margin: pixels next to a cut edge that get weight 0 (``2·margin < overlap``).
    """

    tile: int = 256
    overlap: int = 64
    margin: int = 16

    def check(self, s: int) -> None:
        """Raise ``ValueError`` naming the fix when the layout does not fit spatial stride ``s``."""
        if self.tile % s or self.overlap % s or self.tile <= 0 or self.overlap <= 0:
            raise ValueError(f"Tiling(tile={self.tile}, overlap={self.overlap}): both must be positive "
                             f"multiples of the VAE's spatial stride {s} (e.g. tile=256, overlap=64)")
        if self.overlap >= self.tile or 2 * self.margin >= self.overlap or self.margin < 0:
            raise ValueError(f"Tiling(tile={self.tile}, overlap={self.overlap}, margin={self.margin}): "
                             "need 0 <= 2*margin < overlap < tile (e.g. 256, 64, 16)")


def as_tiling(value) -> Tiling | None:
    """``None`` -> ``None``; an int (tile side in pixels) -> a :class:`Tiling` with an overlap of
    about a quarter tile (a multiple of 16, so it fits both VAEs) and a margin of a quarter overlap;
    a :class:`Tiling` unchanged."""
    if value is None or isinstance(value, Tiling):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        overlap = max(16, value // 4 // 16 * 16)
        return Tiling(tile=value, overlap=overlap, margin=overlap // 4)
    raise TypeError(f"tiling must be None, an int (tile size in pixels) or a Tiling, not {value!r}")


def tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``size`` covering ``[0, n)`` with at least ``overlap`` shared;
    the last tile is aligned to the end. ``n <= size`` gives one tile."""
    if n <= size:
        return [0]
    starts = list(range(0, n - size, size - overlap))
    return starts + [n - size]


def _axis_weight(start: int, length: int, n: int, overlap: int, margin: int) -> torch.Tensor:
    """Blend weight along one axis for a tile at ``[start, start + length)`` of ``[0, n)`` (pixels)."""
    d = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    band = overlap - 2 * margin
    if start > 0:  # a cut on the leading edge
        w = w * ((d - margin) / band).clamp(0, 1)
    if start + length < n:  # a cut on the trailing edge
        w = w * ((length - d - margin) / band).clamp(0, 1)
    return w


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, spatial_stride: int,
                 tiling: Tiling) -> torch.Tensor:
    """Decode ``z [B, C, T, h, w]`` tile by tile and blend.

    Args:
        decode: latent tile ``[B, C, T, th, tw]`` -> pixels ``[B, 3, F, th·s, tw·s]`` (unclamped).
        z: latents (whatever ``decode`` takes).
        spatial_stride: ``s`` (8 for Wan2.1, 16 for Wan2.2).
        tiling: layout in pixels.

    Returns:
        ``[B, 3, F, h·s, w·s]`` float32 on the decoder's device.

    Raises:
        ValueError: a layout that does not fit the stride (:meth:`Tiling.check`).
    """
    s = spatial_stride
    tiling.check(s)
    t_lat, o_lat = tiling.tile // s, tiling.overlap // s
    h, w = z.shape[-2:]
    rows, cols = tile_starts(h, t_lat, o_lat), tile_starts(w, t_lat, o_lat)
    th, tw = min(t_lat, h), min(t_lat, w)  # every tile has this size (the last ones end-aligned)
    out = wsum = None
    for r in rows:
        for c in cols:
            px = decode(z[..., r:r + th, c:c + tw]).float()
            wy = _axis_weight(r * s, th * s, h * s, tiling.overlap, tiling.margin)
            wx = _axis_weight(c * s, tw * s, w * s, tiling.overlap, tiling.margin)
            wt = (wy[:, None] * wx[None, :]).to(px.device)
            if out is None:
                out = px.new_zeros(*px.shape[:-2], h * s, w * s)
                wsum = px.new_zeros(h * s, w * s)
            ys, xs = slice(r * s, (r + th) * s), slice(c * s, (c + tw) * s)
            out[..., ys, xs] += px * wt
            wsum[ys, xs] += wt
            del px
    return out / wsum
