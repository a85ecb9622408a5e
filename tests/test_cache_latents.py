"""wanlora-cache-latents on real media with tiny VAEs: layout, conditioning, staleness, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny_runs import file_metadata
from wanlora.commands.cache_latents import main
from wanlora.dataset import caches as C
from wanlora.dataset.config import load_dataset_config
from wanlora.dataset.frames import resample_indices
from wanlora.dataset.latent_caching import frames_to_video, plan_latent_caches
from wanlora.video_io import probe_video, read_image, read_video_frames, resize_cover_crop

torch.set_num_threads(1)


def flags(tiny_dir, task):
    return json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]


def run(capsys, toml, task, vae, *extra):
    argv = ["--dataset_config", str(toml), "--task", task, "--num_workers", "0", "--no_progress"]
    if vae:
        argv += ["--vae", vae]
    rc = main(argv + list(extra))
    return rc, capsys.readouterr().out


@pytest.fixture
def t2v_set(tmp_path, link_media):
    link_media(tmp_path / "clips", "skeleton_dance.mp4")
    link_media(tmp_path / "imgs", "cat_sunglasses.jpg", "elf_portrait.jpg")
    toml = tmp_path / "dataset.toml"
    toml.write_text("""
[general]
resolution = [64, 64]
enable_bucket = true
[[datasets]]
video_directory = "clips"
cache_directory = "cache/clips"
target_frames = [1, 5]
[[datasets]]
image_directory = "imgs"
cache_directory = "cache/imgs"
""")
    return tmp_path, toml


def test_t2v_images_and_video_then_skip_then_rebuild(t2v_set, tiny_dir, capsys):
    root, toml = t2v_set
    vae_path = flags(tiny_dir, "t2v-A14B")["--vae"]
    rc, out = run(capsys, toml, "t2v-A14B", vae_path)
    assert rc == 0, out
    clips = sorted(p.name for p in (root / "cache/clips").iterdir())
    imgs = sorted(p.name for p in (root / "cache/imgs").iterdir())
    assert clips == ["skeleton_dance_00000-001_80x48_wan21.safetensors", "skeleton_dance_00000-005_80x48_wan21.safetensors"]
    # portrait 832x1104 -> portrait bucket; landscape 1280x720 -> landscape bucket
    assert imgs == ["cat_sunglasses_00000-001_48x80_wan21.safetensors", "elf_portrait_00000-001_80x48_wan21.safetensors"]
    p5 = root / "cache/clips" / clips[1]
    t = load_file(str(p5))
    assert set(t) == {"latents"} and t["latents"].dtype == torch.float32 and t["latents"].shape == (16, 2, 6, 10)
    m = file_metadata(p5)
    assert set(C.LATENT_META_KEYS) <= set(m)
    assert (m["window_start"], m["window_frames"], m["width"], m["height"]) == ("0", "5", "80", "48")
    assert json.loads(m["frame_indices"]) == [0, 1, 2, 3, 4] and m["source"].endswith("skeleton_dance.mp4")
    assert json.loads(m["options"])["resolution"] == [64, 64] and m["vae"].startswith("wan2.1")
    # the cache is the VAE's encoding of exactly the decoded, resized frames
    from wanlora.models import load_vae

    vae = load_vae(vae_path)
    frames = read_video_frames(root / "clips/skeleton_dance.mp4", range(5), size=(80, 48))
    assert torch.allclose(vae.encode(frames_to_video(frames)[None])[0], t["latents"], atol=1e-5)
    img = np.asarray(resize_cover_crop(read_image(root / "imgs/cat_sunglasses.jpg"), (48, 80)))[None]
    lat = load_file(str(root / "cache/imgs" / imgs[0]))["latents"]
    assert lat.shape == (16, 1, 10, 6)
    assert torch.allclose(vae.encode(frames_to_video(img)[None])[0], lat, atol=1e-5)

    mtimes = {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*.safetensors")}
    rc, out = run(capsys, toml, "t2v-A14B", vae_path, "--skip_existing")
    assert rc == 0 and "0 cache file(s) written, 4 skipped as up to date" in out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*.safetensors")}

    toml.write_text(toml.read_text().replace("[64, 64]", "[96, 64]"))
    rc, out = run(capsys, toml, "t2v-A14B", vae_path)
    assert rc == 0 and "4 cache file(s) written, 0 skipped" in out
    names = sorted(p.name for p in (root / "cache").rglob("*.safetensors"))
    assert "skeleton_dance_00000-005_96x64_wan21.safetensors" in names  # 96x64 area: 3:2 is closest to 16:9
    assert not any("_80x48_" in n or "_48x80_" in n for n in names), names  # stale caches removed


def test_stale_cache_same_name_rebuilt(t2v_set, tiny_dir, capsys):
    root, toml = t2v_set
    vae_path = flags(tiny_dir, "t2v-A14B")["--vae"]
    assert run(capsys, toml, "t2v-A14B", vae_path)[0] == 0
    # Same names, other VAE identity: every cache is rebuilt.
    p = next((root / "cache/imgs").iterdir())
    from wanlora.io_utils import save_safetensors

    m = file_metadata(p)
    m["vae"] = "wan2.1-other"
    save_safetensors(load_file(str(p)), p, metadata=m)
    rc, out = run(capsys, toml, "t2v-A14B", vae_path)
    assert rc == 0 and "1 cache file(s) written, 3 skipped" in out
    assert file_metadata(p)["vae"] != "wan2.1-other"
    # Fewer windows: nothing to encode, the dropped window's cache is removed.
    toml.write_text(toml.read_text().replace("target_frames = [1, 5]", "target_frames = [5]"))
    rc, out = run(capsys, toml, "t2v-A14B", vae_path)
    assert rc == 0 and "0 cache file(s) written, 3 skipped" in out
    assert [q.name for q in (root / "cache/clips").iterdir()] == ["skeleton_dance_00000-005_80x48_wan21.safetensors"]


def test_frame_extraction_modes_and_fps_planning(tmp_path, media_dir, link_media):
    link_media(tmp_path / "v", "studio_host.mp4", "skeleton_dance.mp4")
    cases = {
        'frame_extraction = "head"\ntarget_frames = [1, 9]': {"studio_host": [(0, 1), (0, 9)]},
        'frame_extraction = "chunk"\ntarget_frames = [33]': {"studio_host": [(0, 33), (33, 33), (66, 33)]},
        'frame_extraction = "slide"\ntarget_frames = [81]\nframe_stride = 12': {"studio_host": [(0, 81), (12, 81), (24, 81)]},
        'frame_extraction = "uniform"\ntarget_frames = [17]\nframe_sample = 3': {"studio_host": [(0, 17), (44, 17), (89, 17)]},
        'frame_extraction = "full"\nmax_frames = 129': {"studio_host": [(0, 105)], "skeleton_dance": [(0, 129)]},
        'frame_extraction = "full"\nmax_frames = 201\nsource_fps = 50.0': {"skeleton_dance": [(0, 109)]},
    }
    for body, expect in cases.items():
        toml = tmp_path / "d.toml"
        toml.write_text(f'[[datasets]]\nvideo_directory = "v"\ncache_directory = "c"\nresolution = [32, 32]\n{body}\n')
        plan = plan_latent_caches(load_dataset_config(toml, "t2v-A14B"), "id", "wan2.1")
        got = {j.item.stem: [(w.window.start, w.window.frames) for w in j.windows] for j in plan.jobs}
        for stem, wins in expect.items():
            assert got[stem] == wins, (body, got[stem])
    # source_fps: the 50 fps clip resampled to 16 fps (112 frames); windows index the resampled sequence
    toml.write_text('[[datasets]]\nvideo_directory = "v"\ncache_directory = "c"\nresolution = [32, 32]\n'
                    'target_frames = [17]\nframe_extraction = "chunk"\nsource_fps = 50.0\n')
    plan = plan_latent_caches(load_dataset_config(toml, "t2v-A14B"), "id", "wan2.1")
    job = next(j for j in plan.jobs if j.item.stem == "skeleton_dance")
    seq = resample_indices(probe_video(media_dir / "skeleton_dance.mp4").timestamps, 16)
    assert len(seq) == 112 and len(job.windows) == 6  # 112 // 17
    second = job.windows[1]
    assert second.indices == seq[17:34] and second.indices[:3] == [53, 56, 59]
    # studio_host is a 30 fps file declared as 50 fps: its 3.53 s play as 2.12 s -> 33 frames at 16 fps
    job = next(j for j in plan.jobs if j.item.stem == "studio_host")
    assert [w.window.start for w in job.windows] == [0]
    assert job.windows[0].indices[:4] == [0, 3, 6, 9]


def test_i2v_conditioning(tmp_path, link_media, tiny_dir, capsys):
    link_media(tmp_path / "clips", "skeleton_dance.mp4")
    link_media(tmp_path / "imgs", "street_portrait.png")
    toml = tmp_path / "d.toml"
    toml.write_text("""
[general]
resolution = [32, 32]
[[datasets]]
video_directory = "clips"
cache_directory = "cv"
target_frames = [9]
[[datasets]]
image_directory = "imgs"
cache_directory = "ci"
""")
    vae_path = flags(tiny_dir, "i2v-A14B")["--vae"]
    rc, out = run(capsys, toml, "i2v-A14B", vae_path, "--batch_size", "2")
    assert rc == 0, out
    t = load_file(str(tmp_path / "cv" / "skeleton_dance_00000-009_32x32_wan21.safetensors"))
    assert t["latents"].shape == (16, 3, 4, 4) and t["y"].shape == (20, 3, 4, 4)
    y = t["y"]
    assert torch.equal(y[:4, 0], torch.ones(4, 4, 4)) and torch.equal(y[:4, 1:], torch.zeros(4, 2, 4, 4))
    from wanlora.models import load_vae

    vae = load_vae(vae_path)
    video = frames_to_video(read_video_frames(tmp_path / "clips/skeleton_dance.mp4", range(9), size=(32, 32)))[None]
    cond = torch.cat([video[:, :, :1], torch.zeros_like(video[:, :, 1:])], dim=2)  # first frame + 8 zero frames
    assert torch.allclose(y[4:], vae.encode(cond)[0], atol=1e-5)
    assert not torch.allclose(y[4:, 1:], t["latents"][:, 1:], atol=1e-3)
    ti = load_file(str(tmp_path / "ci" / "street_portrait_00000-001_32x32_wan21.safetensors"))
    assert ti["y"].shape == (20, 1, 4, 4) and torch.equal(ti["y"][:4], torch.ones(4, 1, 4, 4))
    assert torch.allclose(ti["y"][4:], ti["latents"], atol=1e-6)  # one frame: the image latent itself


def test_ti2v_first_latent_is_the_image_latent(tmp_path, link_media, tiny_dir, capsys):
    link_media(tmp_path / "clips", "studio_host.mp4")
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nvideo_directory = "clips"\ncache_directory = "c"\nresolution = [96, 64]\n'
                    'enable_bucket = true\ntarget_frames = [5]\n')
    vae_path = flags(tiny_dir, "ti2v-5B")["--vae"]
    rc, out = run(capsys, toml, "ti2v-5B", vae_path)
    assert rc == 0, out
    (p,) = (tmp_path / "c").iterdir()
    assert p.name == "studio_host_00000-005_96x64_wan22.safetensors"  # 32 px unit
    t = load_file(str(p))
    assert set(t) == {"latents"} and t["latents"].shape == (48, 2, 4, 6)
    from wanlora.models import load_vae

    vae = load_vae(vae_path)
    first = frames_to_video(read_video_frames(tmp_path / "clips/studio_host.mp4", [0], size=(96, 64)))[None]
    assert torch.allclose(t["latents"][:, :1], vae.encode(first)[0], atol=1e-5)  # causal VAE


def test_bad_input_reported_rest_cached(tmp_path, media_dir, link_media, tiny_dir, capsys):
    import av

    clips = link_media(tmp_path / "clips", "skeleton_dance.mp4")
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "notes.mp4").write_text("this is a text file\n")
    data = (media_dir / "studio_host.mp4").read_bytes()
    (clips / "trunc.mp4").write_bytes(data[: len(data) // 2])
    with av.open(str(clips / "short.mp4"), "w") as c:  # 3 frames: shorter than [5, 9]
        s = c.add_stream("libx264", rate=16)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for _ in range(3):
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    for n in ("empty", "notes", "trunc", "short"):
        (clips / f"{n}.txt").write_text(n)
    imgs = link_media(tmp_path / "imgs", "elf_portrait.jpg")
    (imgs / "uncaptioned.jpg").symlink_to(media_dir / "cat_sunglasses.jpg")
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\nresolution = [32, 32]\n[[datasets]]\nvideo_directory = "clips"\ncache_directory = "cv"\n'
                    'target_frames = [5, 9]\n[[datasets]]\nimage_directory = "imgs"\ncache_directory = "ci"\n')
    vae_path = flags(tiny_dir, "t2v-A14B")["--vae"]
    rc, out = run(capsys, toml, "t2v-A14B", vae_path, "--num_workers", "1")
    assert rc == 1
    lines = out.splitlines()
    fails = {n: next(line for line in lines if "FAILED" in line and f"/{n}" in line)
             for n in ("empty.mp4", "notes.mp4", "trunc.mp4", "short.mp4", "uncaptioned.jpg")}
    assert "empty (0 bytes)" in fails["empty.mp4"]
    assert "not a video" in fails["notes.mp4"] and "truncated" in fails["trunc.mp4"]
    assert "3 frames, shorter than every target_frames [5, 9]" in fails["short.mp4"]
    assert "no caption" in fails["uncaptioned.jpg"] and "uncaptioned.txt" in fails["uncaptioned.jpg"]
    assert all(line.count(f"/{n}") == 1 for n, line in fails.items()), fails  # the path once per line
    assert "5 item(s) failed" in out
    assert sorted(p.name for p in (tmp_path / "cv").glob("*.safetensors")) == [
        "skeleton_dance_00000-005_32x32_wan21.safetensors", "skeleton_dance_00000-009_32x32_wan21.safetensors"]
    assert [p.name for p in (tmp_path / "ci").glob("*.safetensors")] == ["elf_portrait_00000-001_32x32_wan21.safetensors"]


def test_bad_toml_exit_2(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nvideo_directory = "v"\ntarget_frame = [5]\n')
    rc = main(["--dataset_config", str(toml), "--task", "t2v-A14B", "--vae", "x.pth"])
    err = capsys.readouterr().err
    assert rc == 2 and "datasets[0].target_frame" in err and "did you mean 'target_frames'" in err
    toml.write_text('[[datasets]]\nvideo_directory = "v"\nbatch_size = "4"\n')
    rc = main(["--dataset_config", str(toml), "--task", "t2v-A14B", "--vae", "x.pth"])
    err = capsys.readouterr().err
    assert rc == 2 and "datasets[0].batch_size: expected an integer >= 1, got a string '4'" in err
    assert err.startswith("wanlora-cache-latents: error: ")


def test_wrong_vae_file_one_line_exit_2(t2v_set, tiny_dir, capsys, monkeypatch):
    """A DiT / missing file given as --vae: one line naming the fix, exit 2, no traceback."""
    monkeypatch.delenv("WANLORA_TRACEBACK", raising=False)
    root, toml = t2v_set
    f = flags(tiny_dir, "t2v-A14B")
    for vae, expected in ((f["--t5"], "pass it as --t5"), (str(root / "nope.pth"), "nope.pth")):
        rc = main(["--dataset_config", str(toml), "--task", "t2v-A14B", "--vae", vae, "--no_progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("wanlora-cache-latents: error: ") and expected in err, err
        assert err.count("\n") == 1
    assert not (root / "cache").exists()


def test_debug_mode_writes_trained_frames(tmp_path, link_media, capsys):
    link_media(tmp_path / "clips", "skeleton_dance.mp4")
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nvideo_directory = "clips"\ncache_directory = "c"\nresolution = [32, 32]\n'
                    'target_frames = [5]\nsource_fps = 50\n')
    rc, out = run(capsys, toml, "t2v-A14B", None, "--debug_mode", "image")
    assert rc == 0, out
    files = sorted((tmp_path / "c/debug/skeleton_dance_00000-005_32x32_wan21").iterdir())
    assert len(files) == 5 and not list((tmp_path / "c").glob("*.safetensors"))
    from PIL import Image

    want = read_video_frames(tmp_path / "clips/skeleton_dance.mp4", [0, 3, 6, 9, 12], size=(32, 32))
    assert np.array_equal(np.asarray(Image.open(files[1])), want[1])
    rc, out = run(capsys, toml, "t2v-A14B", None, "--debug_mode", "video")
    assert rc == 0 and probe_video(tmp_path / "c/debug/skeleton_dance_00000-005_32x32_wan21.mp4").frame_count == 5
