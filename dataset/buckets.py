"""Aspect-ratio buckets: the training size of each image or clip.

With ``enable_bucket`` every item gets the size, in multiples of the task's ``pixel_unit`` (16 px,
or 32 px for ti2v-5B), whose aspect ratio is closest to its own among the *maximal* sizes whose
area is at most the resolution's area (for each width the tallest height that fits, and the
other way round). The two candidates of the official TI2V ``best_output_size``
(``wan/utils/utils.py``: width fitted first, height fitted first) are among them, so the bucket
is never further from the item's aspect ratio than the official choice. ``bucket_no_upscale`` caps the area at the item's own,
so small media stay small. Without buckets every item gets the resolution itself.

The item is then resized to *cover* its bucket (antialiased) and center-cropped
(:func:`wanlora.video_io.resize_cover_crop`, :func:`wanlora.video_io.read_video_frames`).
"""

from __future__ import annotations

import math

__all__ = ["bucket_size", "candidate_buckets"]


def _maximal_shapes(area: float, unit: int) -> set[tuple[int, int]]:
    """Every (W, H) in units whose area fits and where neither side can grow by a unit."""
    out = set()
    n = int(area // (unit * unit))
    for k in range(1, n + 1):
        other = int(area / (k * unit) // unit) * unit
        if other >= unit:
            out.add((k * unit, other))
            out.add((other, k * unit))
    return out


def bucket_size(
    width: int,
    height: int,
    resolution: tuple[int, int],
    unit: int,
    enable_bucket: bool = True,
    no_upscale: bool = False,
) -> tuple[int, int]:
    """Bucket ``(W, H)`` in pixels for media of ``width x height`` pixels (as displayed).

    Args:
        resolution: the dataset's ``[W, H]``; its area bounds the bucket's area.
        unit: the task's ``pixel_unit``; both sides are multiples of it (at least one unit).
        enable_bucket: False gives ``resolution`` (rounded down to the unit) for every item.
        no_upscale: cap the area at the media's own area (never enlarge small media).

    Returns:
        (W, H) with ``W*H <= max area`` (at least one unit a side), the aspect ratio closest to
        ``width/height`` (ties: the larger area).
    """
    if not enable_bucket:
        return (max(unit, resolution[0] // unit * unit), max(unit, resolution[1] // unit * unit))
    area = resolution[0] * resolution[1]
    if no_upscale:
        area = min(area, width * height)
    ratio = width / height
    shapes = _maximal_shapes(area, unit) or {(unit, unit)}
    # Closest aspect ratio (log scale, so 2:1 and 1:2 are equally far from 1:1); then larger area.
    return min(shapes, key=lambda s: (round(abs(math.log(s[0] / s[1] / ratio)), 9), -s[0] * s[1], s))


def candidate_buckets(resolution: tuple[int, int], unit: int) -> list[tuple[int, int]]:
    """Every bucket the resolution's area allows (for documentation and tests), sorted by ratio."""
    return sorted(_maximal_shapes(resolution[0] * resolution[1], unit), key=lambda s: s[0] / s[1])
