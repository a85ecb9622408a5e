"""Which frames of a clip are trained: frame-rate resampling and frame windows.

A clip first becomes a *frame sequence*: all its frames, or, with ``source_fps``, the frames picked
to resample it to the task's frame rate (:func:`resample_indices`). The windows of
:func:`frame_windows` are then positions in that sequence; :func:`window_source_indices` maps a
window back to frame numbers of the file.

Extraction modes (musubi-tuner's, for each N in ``target_frames``, all 4n+1):

* ``head``: one window ``[0, N)``;
* ``chunk``: consecutive non-overlapping windows ``[kN, (k+1)N)``;
* ``slide``: windows starting at ``0, frame_stride, 2*frame_stride, ...``;
* ``uniform``: ``frame_sample`` windows with starts spread evenly over ``[0, count-N]``;
* ``full``: one window of the whole clip, cut to ``max_frames`` and rounded down to 4n+1
  (``target_frames`` is not used).

A window never runs past the clip's end; a clip shorter than every N yields no window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["FrameWindow", "frame_windows", "resample_indices", "window_source_indices", "round_frames"]


def round_frames(n: int) -> int:
    """Round a frame count down to the nearest 4n+1 (1, 5, 9, ...); 0 stays 0."""
    return 0 if n < 1 else (int(n) - 1) // 4 * 4 + 1


@dataclass(frozen=True, order=True)
class FrameWindow:
    """``frames`` consecutive positions of the frame sequence starting at ``start``."""

    start: int
    frames: int

    @property
    def stop(self) -> int:
        """One past the window's last position."""
        return self.start + self.frames


def frame_windows(
    count: int,
    mode: str,
    target_frames: Sequence[int],
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
) -> list[FrameWindow]:
    """The windows of a frame sequence of ``count`` frames (sorted, without duplicates).

    Raises:
        ValueError: unknown ``mode``.
    """
    out: set[FrameWindow] = set()
    if mode == "full":
        n = round_frames(min(count, max_frames))
        if n >= 1:
            out.add(FrameWindow(0, n))
        return sorted(out)
    for n in target_frames:
        if n > count:
            continue
        if mode == "head":
            out.add(FrameWindow(0, n))
        elif mode == "chunk":
            out.update(FrameWindow(k * n, n) for k in range(count // n))
        elif mode == "slide":
            out.update(FrameWindow(s, n) for s in range(0, count - n + 1, frame_stride))
        elif mode == "uniform":
            starts = np.linspace(0, count - n, frame_sample, dtype=np.int64)
            out.update(FrameWindow(int(s), n) for s in starts)
        else:
            raise ValueError(f"unknown frame_extraction {mode!r}")
    return sorted(out)


def resample_indices(timestamps: Sequence[float], target_fps: float, time_scale: float = 1.0) -> list[int]:
    """Frame numbers that resample a clip to ``target_fps``, by presentation time.

    Output frame ``k`` is shown at ``k / target_fps`` seconds; it takes the source frame whose
    (scaled) timestamp is nearest. Variable-frame-rate clips resample correctly because real
    timestamps are used, not frame numbers divided by a nominal rate.

    Args:
        timestamps: ascending presentation times (seconds from the first frame).
        target_fps: the task's frame rate (16, or 24 for ti2v-5B).
        time_scale: multiplies every timestamp (``file_fps / source_fps`` when the configured
            ``source_fps`` differs from the file's own rate, e.g. slow-motion footage).

    Returns:
        Frame numbers (non-decreasing; repeats when upsampling), covering the clip's duration.
    """
    t = np.asarray(timestamps, dtype=np.float64) * time_scale
    if t.size == 0:
        return []
    # The last frame is shown for one frame duration: duration = last + median frame interval.
    step = float(np.median(np.diff(t))) if t.size > 1 else 1.0 / target_fps
    duration = t[-1] + step
    n_out = int(np.floor(duration * target_fps + 1e-6))
    n_out = max(n_out, 1)
    targets = np.arange(n_out) / target_fps
    right = np.searchsorted(t, targets, side="left").clip(0, t.size - 1)
    left = (right - 1).clip(0, t.size - 1)
    pick = np.where(np.abs(t[left] - targets) <= np.abs(t[right] - targets), left, right)
    return pick.astype(int).tolist()


def window_source_indices(window: FrameWindow, sequence: Sequence[int] | None) -> list[int]:
    """Frame numbers of the file that a window covers (``sequence`` None = identity)."""
    if sequence is None:
        return list(range(window.start, window.stop))
    return list(sequence[window.start : window.stop])
