"""Media reading and writing: real clips, rotation, seeking, images of every mode, bad files."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
from PIL import Image

from wanlora.video_io import (
    MediaError, image_size, probe_video, read_image, read_video_frames, resize_cover_crop, write_images,
    write_video,
)


def _write_raw(path, frames, fps=16, rotation=None, faststart=False):
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_probe_real_clips(media_dir):
    a = probe_video(media_dir / "skeleton_dance.mp4")
    b = probe_video(media_dir / "studio_host.mp4")  # has an audio track too
    assert (a.width, a.height, a.frame_count, a.fps) == (960, 540, 350, 50.0)
    assert (b.width, b.height, b.frame_count, b.fps) == (1920, 1080, 106, 30.0)
    assert np.allclose(np.diff(a.timestamps), 1 / 50)
    assert a.timestamps[0] == 0.0


def test_seek_equals_sequential_decode(media_dir):
    path = media_dir / "studio_host.mp4"
    info = probe_video(path)
    seq = read_video_frames(path, range(0, 40), size=(64, 32), info=info)
    seek = read_video_frames(path, [37, 30, 30], size=(64, 32), info=info)
    assert seq.shape == (40, 32, 64, 3) and seq.dtype == np.uint8
    assert np.array_equal(seek[0], seq[37]) and np.array_equal(seek[1], seq[30]) and np.array_equal(seek[2], seq[30])
    assert not np.array_equal(seq[0], seq[39])  # frames differ: indices really index frames


def test_resize_cover_center_crop_antialiased(tmp_path):
    # Vertical stripes of 1 px: an antialiased 4x shrink gives flat gray, a point sampler would not.
    a = np.zeros((64, 256, 3), np.uint8)
    a[:, ::2] = 255
    im = resize_cover_crop(Image.fromarray(a), (32, 16))
    arr = np.asarray(im).astype(float)
    assert arr.shape == (16, 32, 3) and abs(arr.mean() - 127.5) < 6 and arr.std() < 20
    # Cover + center crop: a 2:1 image into a square keeps the middle.
    b = np.zeros((32, 64, 3), np.uint8)
    b[:, :16] = 255  # left quarter white -> cropped away
    sq = np.asarray(resize_cover_crop(Image.fromarray(b), (16, 16)))
    assert sq.mean() < 5


def test_rotation_metadata_honored(tmp_path):
    frames = np.zeros((5, 32, 64, 3), np.uint8)
    frames[:, :, :16] = 255  # left band white
    p = tmp_path / "rot.mp4"
    _write_raw(p, frames, rotation=90)
    info = probe_video(p)
    assert (info.width, info.height, info.rotation) == (32, 64, 90)
    out = read_video_frames(p, [0, 4], info=info)
    assert out.shape == (2, 64, 32, 3)
    # 90 degrees counter-clockwise: the left band is now at the bottom.
    assert out[0, -8:].mean() > 200 and out[0, :8].mean() < 30
    small = read_video_frames(p, [0], size=(16, 32), info=info)
    assert small.shape == (1, 32, 16, 3) and small[0, -4:].mean() > 200


def test_frames_matched_by_nearest_timestamp(tmp_path):
    """Frames whose pts are not exactly the probed ones (odd time bases) are matched to the nearest
    timestamp, and decode to the same pixels: the nearest-index lookup must not touch the rotation."""
    import dataclasses

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, 32, 64, 3), dtype=np.uint8)
    p = tmp_path / "v.mp4"
    _write_raw(p, frames)
    info = probe_video(p)
    exact = read_video_frames(p, range(6), info=info)
    shifted = dataclasses.replace(info, pts=tuple(t + 1 for t in info.pts))
    near = read_video_frames(p, range(6), info=shifted)
    assert near.shape == (6, 32, 64, 3) and np.array_equal(near, exact)


def test_frame_folder_as_video(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in (1, 2, 10):
        Image.new("RGB", (40, 20), (i * 20, 0, 0)).save(folder / f"f{i}.png")
    info = probe_video(folder)
    assert info.is_folder and info.frame_count == 3 and (info.width, info.height) == (40, 20)
    out = read_video_frames(folder, [2, 0], info=info)
    assert out[0, 0, 0, 0] == 200 and out[1, 0, 0, 0] == 20  # natural order: f10 is last


def test_images_all_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "a.png")
    assert np.asarray(read_image(tmp_path / "a.png")).min() == 255
    la = Image.new("LA", (4, 4), (0, 128))  # half-transparent black on white -> mid gray
    la.save(tmp_path / "la.png")
    assert abs(int(np.asarray(read_image(tmp_path / "la.png"))[0, 0, 0]) - 127) <= 2
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 255] + [0] * 765)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(read_image(tmp_path / "p.png")).min() == 255
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    assert g.mode == "RGB" and np.asarray(g)[0, 0].tolist() == [77, 77, 77]
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    c = read_image(tmp_path / "c.jpg")
    assert c.mode == "RGB" and np.asarray(c).min() > 240


def test_exif_orientation(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    assert image_size(tmp_path / "o.jpg") == (20, 40)
    out = np.asarray(read_image(tmp_path / "o.jpg"))
    assert out.shape == (40, 20, 3) and out[:8].mean() > 200  # left band now on top


def test_real_images(media_dir):
    cat = read_image(media_dir / "cat_sunglasses.jpg")
    assert cat.size == (832, 1104) and cat.mode == "RGB"
    assert read_image(media_dir / "street_portrait.png").size == (1280, 720)


def test_bad_files(tmp_path, media_dir):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n")
    data = (media_dir / "studio_host.mp4").read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError, match="empty"):
        probe_video(tmp_path / "empty.mp4")
    with pytest.raises(MediaError, match="text.mp4.*not a video"):
        probe_video(tmp_path / "text.mp4")
    with pytest.raises(MediaError, match="trunc.mp4.*truncated"):
        probe_video(tmp_path / "trunc.mp4")
    with pytest.raises(MediaError, match="not found"):
        read_image(tmp_path / "none.png")
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(MediaError, match="x.png: cannot be read as an image"):
        read_image(tmp_path / "x.png")


def test_truncated_faststart_fails_at_decode(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "fs.mp4"
    _write_raw(p, rng.integers(0, 255, (20, 64, 64, 3), dtype=np.uint8), faststart=True)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    info = probe_video(p)
    assert 0 < info.frame_count < 20
    with pytest.raises(MediaError, match="truncated"):
        read_video_frames(p, range(info.frame_count), info=info)


def test_write_video_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(np.linspace(0, 255, 33, dtype=np.uint8)[None, None, :, None], 21, 1).repeat(3, 3)
    frames = np.repeat(frames, 9, axis=0)  # [9, 21, 33, 3], odd sizes
    frames = np.ascontiguousarray(frames)
    p = write_video(tmp_path / "out.mp4", frames, fps=16, metadata={"prompt": "a cat", "seed": "7"})
    info = probe_video(p)
    assert (info.frame_count, info.width, info.height, info.fps) == (9, 34, 22, 16.0)  # padded to even
    with av.open(str(p)) as c:
        assert c.metadata.get("prompt") == "a cat" and c.metadata.get("seed") == "7"
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
    back = read_video_frames(p, range(9), info=info)[:, :21, :33].astype(int)
    assert np.abs(back - frames).mean() < 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp file left
    # float [3, F, H, W] in [-1, 1] also accepted
    x = rng.uniform(-1, 1, (3, 5, 16, 16)).astype(np.float32)
    p2 = write_video(tmp_path / "f.mp4", x, fps=24)
    assert probe_video(p2).frame_count == 5


def test_write_images(tmp_path):
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    frames[1] = 200
    paths = write_images(tmp_path / "imgs", frames)
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert np.asarray(Image.open(paths[1])).min() == 200
