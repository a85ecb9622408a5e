"""Aspect-ratio buckets: unit, area bound, portrait and landscape, no-upscale."""

from __future__ import annotations

import pytest

from wanlora.dataset.buckets import bucket_size, candidate_buckets


@pytest.mark.parametrize("unit", [16, 32])
@pytest.mark.parametrize("wh", [(832, 1104), (1280, 720), (960, 540), (1920, 1080), (500, 500), (300, 1200)])
def test_bucket_invariants(unit, wh):
    res = (832, 480)
    bw, bh = bucket_size(*wh, res, unit)
    assert bw % unit == 0 and bh % unit == 0
    assert bw * bh <= res[0] * res[1]
    r = wh[0] / wh[1]
    # no candidate bucket with a larger area than 90% fits the ratio better by much
    assert abs((bw / bh) / r - 1) < 0.12
    assert bw * bh >= 0.8 * res[0] * res[1]


def test_portrait_and_landscape():
    assert bucket_size(832, 1104, (64, 64), 16) == (48, 80)  # cat_sunglasses.jpg: portrait
    assert bucket_size(1280, 720, (64, 64), 16) == (80, 48)
    assert bucket_size(1280, 720, (1280, 720), 16) == (1280, 720)
    assert bucket_size(1280, 720, (1280, 704), 32) == (1248, 704)


def test_no_upscale_and_disabled():
    assert bucket_size(100, 60, (960, 544), 16, no_upscale=True) == (96, 48)
    assert bucket_size(100, 60, (960, 544), 16) != (96, 48)
    assert bucket_size(1280, 720, (960, 544), 16, no_upscale=True) == bucket_size(1280, 720, (960, 544), 16)
    assert bucket_size(832, 1104, (96, 64), 16, enable_bucket=False) == (96, 64)


def test_candidates_cover_ratios():
    cands = candidate_buckets((64, 64), 16)
    assert (64, 64) in cands and (16, 256) in cands and (256, 16) in cands
    assert all(w * h <= 64 * 64 for w, h in cands)
