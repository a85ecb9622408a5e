"""Frame windows (every extraction mode) and frame-rate resampling by timestamps."""

from __future__ import annotations

import numpy as np
import pytest

from wanlora.dataset.frames import FrameWindow, frame_windows, resample_indices, round_frames
from wanlora.video_io import probe_video


def starts(ws, n):
    return [w.start for w in ws if w.frames == n]


def test_round_frames():
    assert [round_frames(n) for n in (1, 2, 4, 5, 8, 9, 80, 81, 82)] == [1, 1, 1, 5, 5, 9, 77, 81, 81]


def test_modes_on_40_frames():
    # The 40-frame example of musubi-tuner's dataset_config.md.
    assert frame_windows(40, "head", [1, 13, 25]) == [FrameWindow(0, 1), FrameWindow(0, 13), FrameWindow(0, 25)]
    ws = frame_windows(40, "chunk", [13, 25])
    assert starts(ws, 13) == [0, 13, 26] and starts(ws, 25) == [0]
    ws = frame_windows(40, "slide", [1, 13, 25], frame_stride=10)
    assert starts(ws, 1) == [0, 10, 20, 30] and starts(ws, 13) == [0, 10, 20] and starts(ws, 25) == [0, 10]
    ws = frame_windows(40, "uniform", [1, 13, 25], frame_sample=4)
    assert starts(ws, 1) == [0, 13, 26, 39] and starts(ws, 13) == [0, 9, 18, 27] and starts(ws, 25) == [0, 5, 10, 15]
    assert all(w.stop <= 40 for w in ws)


def test_full_and_too_short():
    assert frame_windows(20, "full", [1], max_frames=31) == [FrameWindow(0, 17)]
    assert frame_windows(35, "full", [1], max_frames=33) == [FrameWindow(0, 33)]
    assert frame_windows(35, "full", [1], max_frames=31) == [FrameWindow(0, 29)]  # 4n+1
    assert frame_windows(10, "head", [17, 33]) == []
    assert frame_windows(16, "chunk", [17]) == []


def test_windows_on_real_clip(media_dir):
    info = probe_video(media_dir / "studio_host.mp4")
    assert info.frame_count == 106
    ws = frame_windows(info.frame_count, "chunk", [33])
    assert [(w.start, w.frames) for w in ws] == [(0, 33), (33, 33), (66, 33)]
    ws = frame_windows(info.frame_count, "slide", [81], frame_stride=12)
    assert starts(ws, 81) == [0, 12, 24]  # 24 + 81 = 105 <= 106; 36 + 81 > 106
    ws = frame_windows(info.frame_count, "uniform", [17], frame_sample=3)
    assert starts(ws, 17) == [0, 44, 89]  # linspace(0, 106-17, 3)
    assert frame_windows(info.frame_count, "full", [1], max_frames=129) == [FrameWindow(0, 105)]


def test_resample_50_to_16_fps(media_dir):
    info = probe_video(media_dir / "skeleton_dance.mp4")
    assert (info.frame_count, info.fps) == (350, 50.0)
    seq = resample_indices(info.timestamps, 16)
    assert len(seq) == 112  # 7.0 s at 16 fps
    expect = [int(np.floor(k * 50 / 16 + 0.5)) for k in range(112)]
    assert max(abs(a - b) for a, b in zip(seq, expect)) <= 1
    assert seq[:6] == [0, 3, 6, 9, 12, 16]


def test_resample_variable_frame_rate():
    # 1 s at 10 fps then 1 s at 40 fps: timestamps, not frame numbers, decide.
    t = list(np.arange(10) / 10) + list(1 + np.arange(40) / 40)
    seq = resample_indices(t, 20)
    times = np.asarray(t)[seq]
    targets = np.arange(len(seq)) / 20
    assert len(seq) == 40
    assert np.abs(times - targets).max() <= 0.05 + 1e-9
    assert seq[:4] == [0, 0, 1, 1] or seq[:4] == [0, 1, 1, 2]


@pytest.mark.parametrize("scale, n", [(1.0, 16), (2.0, 32)])
def test_time_scale(scale, n):
    t = np.arange(16) / 16
    assert len(resample_indices(t, 16, time_scale=scale)) == n
