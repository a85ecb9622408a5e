"""Conditioning of the Wan2.1 image models (i2v-14B, flf2v-14B): the FLF2V mask against the official
code restated, CLIP features cached and built for generation, the last frame, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from wanlora.conditioning import (
    KINDS,
    ClipImageToVideo,
    FirstLastFrameToVideo,
    clip_features,
    conditioning_for,
    flf2v_last_frame,
    i2v_mask,
    i2v_size,
    i2v_y,
    image_to_tensor,
)
from wanlora.inference.pipeline import GenerationRequest, WanPipeline
from wanlora.inference.sampling import guided_velocity
from wanlora.models import load_clip, load_dit, load_vae
from wanlora.tasks import TASKS
from wanlora.video_io import read_image

torch.set_num_threads(1)


def _official_flf2v_mask(frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """``msk`` of ``wan/first_last_frame2video.py`` with its hard-coded 81 replaced by ``frames``."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:-1] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def _models(tiny_dir, task):
    d = tiny_dir(task)
    flags = json.loads((d / "manifest.json").read_text())["flags"]
    return load_dit(flags["--dit"], task), load_vae(flags["--vae"]), load_clip(flags["--clip"])


def test_kinds_of_the_wan21_image_tasks():
    i2v, flf = conditioning_for("i2v-14B"), conditioning_for("flf2v-14B")
    assert type(i2v) is ClipImageToVideo and type(flf) is FirstLastFrameToVideo
    assert KINDS[TASKS["i2v-14B"].conditioning] is ClipImageToVideo
    assert (i2v.model_type, flf.model_type) == ("i2v", "flf2v")
    assert i2v.cache_keys == flf.cache_keys == ("y", "clip_fea")
    assert (i2v.known_frames, flf.known_frames) == ((0,), (0, -1))
    assert (i2v.requires_end_image, flf.requires_end_image, conditioning_for("i2v-A14B").requires_end_image) == (
        False, True, False)
    assert i2v.uses_clip and flf.uses_clip and not conditioning_for("i2v-A14B").uses_clip
    for name in ("i2v-14B", "flf2v-14B"):  # the task table's CLIP frames are the mask's known frames
        assert TASKS[name].clip_frames == len(conditioning_for(name).known_frames)


@pytest.mark.parametrize("frames", [5, 9, 81])
def test_flf2v_mask_equals_the_official_one(frames):
    assert torch.equal(i2v_mask(frames, 3, 5, (0, -1)), _official_flf2v_mask(frames, 3, 5))


def test_cache_tensors_hold_y_and_the_clip_features_of_the_known_frames(tiny_dir):
    _, vae, clip = _models(tiny_dir, "flf2v-14B")
    videos = torch.rand(2, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for name, idx in (("i2v-14B", [0]), ("flf2v-14B", [0, 8])):
        cond = conditioning_for(name)
        got = cond.cache_tensors(vae, videos, clip)
        assert torch.equal(got["y"], i2v_y(vae, videos, cond.known_frames))
        want = torch.cat([clip.encode(videos[:, :, i]) for i in idx], dim=1)
        assert got["clip_fea"].shape == (2, 257 * len(idx), clip.dim)
        assert torch.equal(got["clip_fea"], want)
    with pytest.raises(ValueError, match="--clip"):
        conditioning_for("i2v-14B").cache_tensors(vae, videos, None)


def test_training_inputs_carry_the_cached_clip_features():
    x0 = torch.randn(2, 16, 3, 4, 4)
    batch = {"y": torch.randn(2, 20, 3, 4, 4), "clip_fea": torch.randn(2, 514, 8).half()}
    got = conditioning_for("flf2v-14B").training_inputs(batch, x0, x0 + 1, torch.tensor([1.0, 2.0]), None)
    assert torch.equal(got.y, batch["y"]) and got.clip_fea.dtype == torch.float32
    assert torch.equal(got.clip_fea, batch["clip_fea"].float()) and got.loss_mask is None


def test_flf2v_last_frame_is_brought_to_the_first_frames_size():
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    assert torch.equal(flf2v_last_frame(img, 40, 30), image_to_tensor(img))
    wide = Image.new("RGB", (100, 30), (0, 0, 0))
    wide.paste((255, 255, 255), (40, 0, 60, 30))  # a white band in the middle survives the crop
    out = flf2v_last_frame(wide, 40, 30)
    assert out.shape == (3, 30, 40)
    assert out[:, :, 20].min() > 0.9 and out[:, :, 0].max() < -0.9


def test_pipeline_builds_clip_features_and_flf2v_y(tiny_dir, media_dir):
    """Generation: CLIP sees the input image(s) as given (the official pipelines), y holds the first
    frame and (FLF2V) the last frame resized to the output size, and both passes get clip_fea."""
    dit, vae, clip = _models(tiny_dir, "flf2v-14B")
    first = read_image(media_dir / "elf_portrait.jpg")  # 1280x720
    last = read_image(media_dir / "cat_sunglasses.jpg")  # 832x1104: another size and aspect ratio
    pipe = WanPipeline("flf2v-14B", dit, vae=vae, clip=clip)
    ctx = [torch.randn(3, 32)]
    req = GenerationRequest("x", height=64, width=112, frames=9, steps=2, seed=1, image=first, end_image=last)
    p = pipe.prepare(req, ctx, ctx)
    H, W = p.request.height, p.request.width
    assert (H, W) == i2v_size(1280, 720, 64 * 112) and p.request.flow_shift == 16.0  # the first image's shape
    last_px = flf2v_last_frame(last, first.width, first.height)
    want_fea = torch.cat([clip.encode(image_to_tensor(first)[None]), clip.encode(last_px[None])], dim=1)[0]
    assert torch.equal(p.clip_fea, want_fea)
    first_px = torch.nn.functional.interpolate(image_to_tensor(first)[None], size=(H, W), mode="bicubic")[0]
    last_px = torch.nn.functional.interpolate(last_px[None], size=(H, W), mode="bicubic")[0]
    video = torch.cat([first_px[:, None], torch.zeros(3, 7, H, W), last_px[:, None]], dim=1)
    assert torch.equal(p.y, i2v_y(vae, video[None], (0, -1))[0])
    assert (p.y[:4, 0] == 1).all() and (p.y[:4, 1] == 0).all() and (p.y[3, -1] == 1).all()
    latent = pipe.denoise(p)
    assert latent.shape == p.noise.shape and torch.isfinite(latent).all()
    # without the last frame, or without CLIP: one-line errors naming the flag
    with pytest.raises(ValueError, match="--end_image_path"):
        pipe.prepare(GenerationRequest("x", height=64, width=64, frames=9, image=first), ctx, ctx)
    with pytest.raises(ValueError, match="--clip"):
        WanPipeline("flf2v-14B", dit, vae=vae).prepare(req, ctx, ctx)


def test_i2v_14b_pipeline_uses_the_image_as_given_and_480p_shift(tiny_dir, media_dir):
    dit, vae, clip = _models(tiny_dir, "i2v-14B")
    img = read_image(media_dir / "street_portrait.png")
    pipe = WanPipeline("i2v-14B", dit, vae=vae, clip=clip)
    ctx = [torch.randn(2, 32)]
    p = pipe.prepare(GenerationRequest("x", height=480, width=832, frames=5, steps=2, image=img), ctx, ctx)
    assert p.request.flow_shift == 3.0  # the official i2v default at 832*480
    assert torch.equal(p.clip_fea, clip.encode(image_to_tensor(img)[None])[0])
    assert p.clip_fea.shape == (257, clip.dim)
    big = pipe.resolve(GenerationRequest("x", height=720, width=1280))
    assert big.flow_shift == 5.0


def test_guided_velocity_gives_clip_fea_to_both_passes():
    seen = []

    def model(x, t, ctx, y=None, clip_fea=None):
        seen.append(None if clip_fea is None else clip_fea.shape)
        per_sample = clip_fea.sum((1, 2)) + torch.stack([c.sum() for c in ctx])
        return x * (1 + per_sample.view(-1, 1, 1, 1, 1))

    x, t = torch.randn(1, 4, 2, 2, 2), torch.tensor([10.0])
    fea = torch.randn(1, 6, 3)
    a = guided_velocity(model, x, t, [torch.ones(2, 3)], [torch.zeros(2, 3)], 4.0, clip_fea=fea, batched=True)
    b = guided_velocity(model, x, t, [torch.ones(2, 3)], [torch.zeros(2, 3)], 4.0, clip_fea=fea, batched=False)
    torch.testing.assert_close(a, b)
    assert seen == [(2, 6, 3), (1, 6, 3), (1, 6, 3)]


def test_training_samples_of_flf2v_use_clip_and_both_frames(tiny_dir, tmp_path, media_dir):
    from wanlora.training.validation import ValidationSampler

    task = "flf2v-14B"
    flags = json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"a cat --i {media_dir / 'cat_sunglasses.jpg'} --ei {media_dir / 'elf_portrait.jpg'} --s 2 --d 3\n",
                  encoding="utf-8")
    args = (task, pf, flags["--vae"], flags["--t5"], flags["--t5_tokenizer"])
    with pytest.raises(ValueError, match="--clip"):
        ValidationSampler(*args, output_dir=tmp_path, device="cpu")
    sampler = ValidationSampler(*args, output_dir=tmp_path, output_name="l", width=32, height=32, frames=5,
                                device="cpu", clip_path=flags["--clip"])
    (req,) = sampler.requests()
    assert req.end_image is not None and req.end_image_path.endswith("elf_portrait.jpg")
    (s,) = sampler.sample(7, load_dit(flags["--dit"], task))
    assert s.path.name == "l_000007_00_3.mp4" and s.frames.shape[0] == 5
    bad = tmp_path / "bad.txt"
    bad.write_text(f"a cat --i {media_dir / 'cat_sunglasses.jpg'}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a last frame: add --ei"):
        ValidationSampler(task, bad, *args[2:], device="cpu", clip_path=flags["--clip"])
