"""Image conditioning in one place: the task table's choice, the I2V mask, the TI2V first frame,
and the cached ``y`` equal to the pipeline's ``y`` for the same image at the same size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tiny_runs import file_metadata
from wanlora.commands.cache_latents import main as cache_latents_main
from wanlora.conditioning import (
    KINDS,
    FirstFrameLatent,
    ImageToVideo,
    TextToVideo,
    clean_first_frame,
    conditioning_for,
    i2v_mask,
    per_sample_mse,
)
from wanlora.inference.pipeline import GenerationRequest, WanPipeline
from wanlora.models import load_vae
from wanlora.tasks import TASKS
from wanlora.video_io import read_image, read_video_frames, resize_cover_crop

torch.set_num_threads(1)


# ---- the choice, once per task -------------------------------------------------------------------


def test_every_task_kind_has_its_conditioning():
    want = {"t2v-A14B": TextToVideo, "t2v-14B": TextToVideo, "t2v-1.3B": TextToVideo,
            "i2v-A14B": ImageToVideo, "ti2v-5B": FirstFrameLatent}
    assert set(want) <= set(TASKS)
    for name, cls in want.items():
        c = conditioning_for(name)
        assert type(c) is cls and c.kind == TASKS[name].conditioning and KINDS[c.kind] is cls
    i2v, ti2v, t2v = conditioning_for("i2v-A14B"), conditioning_for("ti2v-5B"), conditioning_for("t2v-A14B")
    assert (i2v.requires_image, ti2v.requires_image, t2v.requires_image) == (True, False, False)
    assert (i2v.uses_image, ti2v.uses_image, t2v.uses_image) == (True, True, False)
    assert (i2v.cache_keys, ti2v.cache_keys, t2v.cache_keys) == (("y",), (), ())
    # channels: what y adds to the noisy latent is what the task's DiT takes beyond its output
    assert TASKS["i2v-A14B"].in_channels - TASKS["i2v-A14B"].out_channels == 4 + TASKS["i2v-A14B"].latent_channels


def test_first_frame_training_only_where_it_applies():
    assert conditioning_for("ti2v-5B", 0.5).first_frame_prob == 0.5
    with pytest.raises(ValueError, match=r"--ti2v_first_frame is for --task ti2v-5B; i2v-A14B takes its first "
                                         r"frame from the cached y"):
        conditioning_for("i2v-A14B", 0.5)
    with pytest.raises(ValueError, match="t2v-1.3B is text-to-video"):
        conditioning_for("t2v-1.3B", 1.0)
    with pytest.raises(ValueError, match=r"--ti2v_first_frame 1.5: a probability in \[0, 1\]"):
        conditioning_for("ti2v-5B", 1.5)


# ---- numerics ------------------------------------------------------------------------------------


def test_i2v_mask_layout():
    # m = [1,0,...,0] (9 frames) -> frame 0 four times: [1,1,1,1, 0 x 8] -> [3, 4] -> [4, 3]
    m = i2v_mask(9, 2, 3)
    assert m.shape == (4, 3, 2, 3) and m.dtype == torch.float32
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()
    # channel c of latent frame τ is m'[4τ + c]: frame 1 known -> latent 1, channel 0
    assert i2v_mask(9, 1, 1, known_frames=(0, 1))[:, :, 0, 0].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]
    # first and last frame (the official FLF2V msk[:, 1:-1] = 0): the last latent frame's channel 3
    assert i2v_mask(9, 1, 1, known_frames=(0, -1))[:, :, 0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="4n\\+1"):
        i2v_mask(8, 1, 1)


def test_clean_first_frame_and_masked_loss():
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(3, 2, 4, 2, 2, generator=g), torch.randn(3, 2, 4, 2, 2, generator=g)
    t = torch.tensor([100.0, 500.0, 900.0])
    chosen = torch.tensor([True, False, True])
    xc, tc, keep = clean_first_frame(x0, x_t, t, chosen)
    assert torch.equal(xc[chosen, :, 0], x0[chosen, :, 0]) and torch.equal(xc[~chosen], x_t[~chosen])
    assert torch.equal(xc[:, :, 1:], x_t[:, :, 1:]) and not torch.equal(x_t[0, :, 0], x0[0, :, 0])  # input kept
    assert tc.tolist() == [[0.0, 100, 100, 100], [500.0] * 4, [0.0, 900, 900, 900]]
    assert keep[:, 0, :, 0, 0].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    err = torch.rand(3, 2, 4, 2, 2, generator=g)
    got = per_sample_mse(err, keep)
    want = torch.stack([err[0, :, 1:].mean(), err[1].mean(), err[2, :, 1:].mean()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.equal(per_sample_mse(err), err.mean(dim=(1, 2, 3, 4)))


def test_training_inputs_per_kind():
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    t = torch.tensor([300.0, 700.0])
    y = torch.randn(2, 20, 3, 2, 2, dtype=torch.bfloat16, generator=g)
    plain = conditioning_for("t2v-A14B").training_inputs({"y": y}, x0, x_t, t, g)
    assert plain.x_t is x_t and plain.timestep is t and plain.y is None and plain.loss_mask is None
    i2v = conditioning_for("i2v-A14B").training_inputs({"y": y}, x0, x_t, t, g)
    assert i2v.y.dtype == torch.float32 and torch.equal(i2v.y, y.float()) and i2v.loss_mask is None
    state = g.get_state()
    off = conditioning_for("ti2v-5B").training_inputs({}, x0, x_t, t, g)
    assert off.timestep is t and torch.equal(g.get_state(), state)  # no draw without first_frame_prob
    on = conditioning_for("ti2v-5B", 1.0).training_inputs({}, x0, x_t, t, g)
    assert on.timestep[:, 0].eq(0).all() and on.loss_mask[:, 0, 0].eq(0).all()
    image = conditioning_for("ti2v-5B", 1.0).training_inputs({}, x0[:, :, :1], x_t[:, :, :1], t, g)
    assert image.timestep is t and image.loss_mask is None  # one latent frame trains as text-to-image


# ---- the cached y is the pipeline's y ------------------------------------------------------------


def _pipeline_y(vae, image: Image.Image, frames: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The y ``WanPipeline.prepare`` builds for ``image`` at its own size (area = its pixels)."""
    stand_in = {e: torch.nn.Identity() for e in TASKS["i2v-A14B"].experts}  # prepare never runs a DiT
    pipe = WanPipeline("i2v-A14B", stand_in, vae=vae)
    ctx = [torch.zeros(3, 32)]
    p = pipe.prepare(GenerationRequest("x", height=image.height, width=image.width, frames=frames, image=image),
                     ctx, ctx)
    return p.y, (p.request.height, p.request.width)


def test_cached_y_equals_pipeline_y(tmp_path, media_dir, tiny_dir):
    """wanlora-cache-latents (i2v-A14B, tiny VAE) on an image and a clip: each cache's ``y`` equals,
    bit for bit, the ``y`` the generation pipeline builds from the same first frame at the same
    size (for the clip: a 9-frame window, so the mask spans 3 latent frames)."""
    imgs, clips = tmp_path / "imgs", tmp_path / "clips"
    imgs.mkdir()
    clips.mkdir()
    # an image already at the bucket size: the cache and the pipeline read the same file as it is
    Image.open(media_dir / "cat_sunglasses.jpg").convert("RGB").resize((64, 64)).save(imgs / "cat.png")
    (imgs / "cat.txt").write_text("a cat")
    # an image the cache resizes (cover + crop): the pipeline gets that resized image
    (imgs / "street_portrait.png").symlink_to(media_dir / "street_portrait.png")
    (imgs / "street_portrait.txt").write_text("a street portrait")
    (clips / "skeleton_dance.mp4").symlink_to(media_dir / "skeleton_dance.mp4")
    (clips / "skeleton_dance.txt").write_text("a skeleton dances")
    toml = tmp_path / "d.toml"
    toml.write_text("""
[general]
resolution = [64, 64]
[[datasets]]
image_directory = "imgs"
cache_directory = "ci"
[[datasets]]
video_directory = "clips"
cache_directory = "cv"
target_frames = [9]
""")
    vae_path = json.loads((tiny_dir("i2v-A14B") / "manifest.json").read_text())["flags"]["--vae"]
    assert cache_latents_main(["--dataset_config", str(toml), "--task", "i2v-A14B", "--vae", vae_path,
                               "--num_workers", "0", "--no_progress"]) == 0
    vae = load_vae(vae_path, dtype=torch.float32, device="cpu")  # what the command loads by default

    cached = load_file(str(tmp_path / "ci" / "cat_00000-001_64x64_wan21.safetensors"))["y"]
    y, size = _pipeline_y(vae, read_image(imgs / "cat.png"), frames=1)
    assert size == (64, 64) and y.shape == cached.shape == (20, 1, 8, 8)
    assert torch.equal(y, cached)

    path = next((tmp_path / "ci").glob("street_portrait_*_wan21.safetensors"))
    w, h = int(file_metadata(path)["width"]), int(file_metadata(path)["height"])
    resized = resize_cover_crop(read_image(imgs / "street_portrait.png"), (w, h))
    y, size = _pipeline_y(vae, resized, frames=1)
    assert size == (h, w) and torch.equal(y, load_file(str(path))["y"])

    path = next((tmp_path / "cv").glob("skeleton_dance_*_wan21.safetensors"))
    meta = file_metadata(path)
    w, h = int(meta["width"]), int(meta["height"])
    first = read_video_frames(clips / "skeleton_dance.mp4", json.loads(meta["frame_indices"])[:1], size=(w, h))[0]
    y, size = _pipeline_y(vae, Image.fromarray(np.ascontiguousarray(first)), frames=9)
    cached = load_file(str(path))["y"]
    assert size == (h, w) and y.shape == cached.shape == (20, 3, h // 8, w // 8)
    assert torch.equal(y, cached)
    assert y[:4, 0].eq(1).all() and y[:4, 1:].eq(0).all() and y[4:, 1:].abs().sum() > 0
