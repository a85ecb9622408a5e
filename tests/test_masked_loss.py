"""Masked loss: mask_directory in the dataset TOML, masks on the latent grid in the latent caches,
the loss as the weighted mean, and a tiny training run with masks."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from tiny_runs import train_argv
from wanlora.commands.cache_latents import main as cache_latents_main
from wanlora.commands.cache_text import main as cache_text_main
from wanlora.conditioning import per_sample_mse
from wanlora.dataset import MissingCachesError, TrainingDataset
from wanlora.dataset.config import DatasetConfigError, load_dataset_config
from wanlora.dataset.masks import latent_mask, luma
from wanlora.training import flow
from wanlora.training.trainer import flow_matching_loss

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after


# ---- the loss ---------------------------------------------------------------------------------


def test_weighted_mse_equals_the_hand_computed_weighted_mean():
    g = torch.Generator().manual_seed(0)
    err = torch.rand(2, 3, 2, 2, 2, generator=g)
    w = torch.rand(2, 1, 2, 2, 2, generator=g)
    w[1] = 0.0  # a sample without any weight trains nothing
    got = per_sample_mse(err, w)
    num = sum(float(w[0, 0, f, y, x]) * float(err[0, c, f, y, x])
              for c, f, y, x in itertools.product(range(3), range(2), range(2), range(2)))
    den = sum(float(w[0, 0, f, y, x]) * 3 for f, y, x in itertools.product(range(2), range(2), range(2)))
    assert got[0].item() == pytest.approx(num / den, rel=1e-6)
    assert got[1].item() == 0.0
    # the TI2V frame mask [B, 1, F, 1, 1] keeps its meaning: the mean over the kept frames
    keep = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1).expand(2, 1, 2, 1, 1)
    assert torch.allclose(per_sample_mse(err, keep), err[:, :, :1].mean(dim=(1, 2, 3, 4)))


def _loss(batch, seed=3):
    """flow_matching_loss of a fixed linear 'model' on ``batch`` with generator seed ``seed``."""
    sampler = flow.TimestepDistribution("uniform")
    model = lambda x, t, c, y, clip: 0.5 * x  # noqa: E731
    return flow_matching_loss(model, batch, sampler, 0, 1000, torch.Generator().manual_seed(seed), "cpu")


def test_masked_flow_loss_is_the_weighted_loss_and_all_ones_is_exactly_unmasked():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 4, 4, generator=g)
    ctx = [torch.zeros(2, 8)] * 2
    mask = torch.rand(2, 1, 3, 4, 4, generator=g)
    loss, t = _loss({"latents": x0, "context": ctx, "mask": mask})
    # by hand, with the draws flow_matching_loss makes in its order (noise, then timesteps)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=gen)
    t_hand = flow.TimestepDistribution("uniform").sample(2, gen, 0, 1000)
    sigma = (t_hand / 1000).view(2, 1, 1, 1, 1)
    err = (0.5 * ((1 - sigma) * x0 + sigma * noise) - (noise - x0)) ** 2
    want = torch.stack([(err[b] * mask[b]).sum() / (mask[b].sum() * 4) for b in range(2)]).mean()
    assert torch.equal(t, t_hand)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    unmasked, _ = _loss({"latents": x0, "context": ctx})
    ones, _ = _loss({"latents": x0, "context": ctx, "mask": torch.ones_like(mask)})
    assert torch.equal(ones, unmasked)  # bit for bit
    assert loss.item() != pytest.approx(unmasked.item(), rel=1e-3)


# ---- the latent grid --------------------------------------------------------------------------


def test_latent_mask_is_the_mean_of_the_pixels_each_cell_encodes():
    rng = np.random.default_rng(0)
    m = rng.random((9, 16, 32)).astype(np.float32)
    got = latent_mask(m, (4, 8, 8))
    assert got.shape == (1, 3, 2, 4) and got.dtype == torch.float32
    frames = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # the VAE's causal frame groups
    for k, fr in enumerate(frames):
        for y, x in itertools.product(range(2), range(4)):
            block = m[fr][:, 8 * y:8 * y + 8, 8 * x:8 * x + 8]
            assert got[0, k, y, x].item() == pytest.approx(float(block.mean()), rel=1e-6)
    # the same as area interpolation of each frame group's mean (sd-scripts' resize)
    grouped = torch.stack([torch.from_numpy(m[fr]).mean(0) for fr in frames])
    area = F.interpolate(grouped[:, None], size=(2, 4), mode="area")[:, 0]
    assert torch.allclose(got[0], area, atol=1e-6)
    with pytest.raises(ValueError, match="VAE stride"):
        latent_mask(m[:8], (4, 8, 8))


def test_luma_is_pillows_gray_level():
    rgb = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(luma(rgb), np.asarray(Image.fromarray(rgb).convert("L")))


# ---- caching ----------------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _flags(tiny_dir, task="t2v-A14B"):
    return json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]


@pytest.fixture
def masked_set(tmp_path):
    """Synthetic data: two 32x32 images (one with a mask, one without) and one 9-frame clip as a
    folder of frames with a per-frame mask folder."""
    rng = np.random.default_rng(0)
    imgs, clips = tmp_path / "imgs", tmp_path / "clips"
    for name in ("a", "b"):
        _png(imgs / f"{name}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        (imgs / f"{name}.txt").write_text(f"picture {name}")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    mask[:8, 16:] = 128
    _png(tmp_path / "masks" / "a.png", mask)
    for k in range(9):
        _png(clips / "walk" / f"f{k}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        _png(tmp_path / "clip_masks" / "walk" / f"m{k}.png", np.full((32, 32), 20 * k, np.uint8))
    (clips / "walk.txt").write_text("a walk")
    toml = tmp_path / "d.toml"
    toml.write_text("""
[general]
resolution = [32, 32]
[[datasets]]
image_directory = "imgs"
cache_directory = "ci"
mask_directory = "masks"
[[datasets]]
video_directory = "clips"
cache_directory = "cv"
mask_directory = "clip_masks"
target_frames = [9]
""")
    return tmp_path, toml, mask


def _cache(toml, tiny_dir, task="t2v-A14B"):
    return cache_latents_main(["--dataset_config", str(toml), "--task", task, "--vae", _flags(tiny_dir, task)["--vae"],
                               "--num_workers", "0", "--no_progress"])


def test_masks_cached_on_the_latent_grid(masked_set, tiny_dir, caplog, capsys):
    root, toml, mask = masked_set
    with caplog.at_level(logging.WARNING):
        assert _cache(toml, tiny_dir) == 0
    assert "1 item(s) have no mask" in caplog.text and "b.png" in caplog.text
    a = load_file(str(next((root / "ci").glob("a_*.safetensors"))))
    assert a["mask"].shape == (1, 1, 4, 4) == (1, *a["latents"].shape[1:])
    assert torch.equal(a["mask"], latent_mask((mask / 255.0)[None], (4, 8, 8)))
    assert a["mask"][0, 0, 0].tolist() == pytest.approx([1, 1, 128 / 255, 128 / 255])
    assert "mask" not in load_file(str(next((root / "ci").glob("b_*.safetensors"))))
    walk = load_file(str(next((root / "cv").glob("walk_*.safetensors"))))
    # per-frame mask: latent frame 0 = frame 0, then the means of frames 1..4 and 5..8
    want = [0.0, (20 + 40 + 60 + 80) / 4 / 255, (100 + 120 + 140 + 160) / 4 / 255]
    assert walk["mask"].shape == (1, 3, 4, 4)
    assert walk["mask"][0, :, 0, 0].tolist() == pytest.approx(want, rel=1e-6)
    capsys.readouterr()
    # a changed mask makes that cache stale (and only that one)
    mask2 = mask.copy()
    mask2[:] = 255
    _png(root / "masks" / "a.png", mask2)
    assert _cache(toml, tiny_dir) == 0
    assert "1 cache file(s) written, 2 skipped" in capsys.readouterr().out
    assert torch.equal(load_file(str(next((root / "ci").glob("a_*.safetensors"))))["mask"], torch.ones(1, 1, 4, 4))


def test_mask_problems_name_the_file_and_the_fix(masked_set, tiny_dir, capsys):
    root, toml, _ = masked_set
    _png(root / "masks" / "a.png", np.zeros((16, 32), np.uint8))  # another aspect ratio
    shutil.rmtree(root / "clip_masks" / "walk")
    for k in range(5):  # too few frames
        _png(root / "clip_masks" / "walk" / f"m{k}.png", np.zeros((32, 32), np.uint8))
    assert _cache(toml, tiny_dir) == 1
    out = capsys.readouterr().out
    assert "masks/a.png: mask is 32x16 but a.png is 32x32" in out and "re-export it at the media's size" in out
    assert "mask has 5 frames but walk has 9" in out
    _png(root / "masks" / "b.jpg", np.zeros((32, 32), np.uint8))
    _png(root / "masks" / "b.png", np.zeros((32, 32), np.uint8))
    assert _cache(toml, tiny_dir) == 1
    assert "2 masks answer to 'b'" in capsys.readouterr().out
    (root / "d.toml").write_text(toml.read_text().replace('"masks"', '"nowhere"'))
    with pytest.raises(DatasetConfigError, match=r"datasets\[0\]\.mask_directory: folder not found"):
        load_dataset_config(root / "d.toml", "t2v-A14B")


def test_training_batches_carry_the_masks(masked_set, tiny_dir):
    root, toml, mask = masked_set
    flags = _flags(tiny_dir)
    # cached before masks were configured: the training dataset says so
    plain = root / "plain.toml"
    plain.write_text("\n".join(line for line in toml.read_text().splitlines() if "mask_directory" not in line))
    assert _cache(plain, tiny_dir) == 0
    assert cache_text_main(["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer",
                            flags["--t5_tokenizer"], "--no_progress"]) == 0
    assert "mask" not in TrainingDataset(plain, task="t2v-A14B", shuffle=False)[0]
    with pytest.raises(MissingCachesError, match="was made without the masks of mask_directory") as e:
        TrainingDataset(toml, task="t2v-A14B")
    assert "wanlora-cache-latents --dataset_config" in str(e.value)
    assert _cache(toml, tiny_dir) == 0
    ds = TrainingDataset(toml, task="t2v-A14B", shuffle=False)
    batches = {b["keys"][0].split("_")[0]: b for b in (ds[i] for i in range(len(ds)))}
    assert torch.equal(batches["a"]["mask"][0], latent_mask((mask / 255.0)[None], (4, 8, 8)))
    assert torch.equal(batches["b"]["mask"], torch.ones(1, 1, 1, 4, 4))  # no mask file: full weight
    assert batches["walk"]["mask"].shape == (1, 1, 3, 4, 4)


# ---- a tiny training run ----------------------------------------------------------------------


def _train(flags, toml, out, *extra):
    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import train

    state = train(parse_config(train_argv(flags, out, "--max_train_steps", "3", *extra, dataset=toml)))
    return state, load_file(str(out / "lora.safetensors"))


def _media_or_synthetic(root: Path, media_dir: Path | None) -> tuple[Path, Path]:
    """Images (the real photos when ../shared/media is there, else synthetic PNGs) with a mask that
    keeps the left half of each; returns (images folder, masks folder)."""
    imgs, masks = root / "imgs", root / "masks"
    imgs.mkdir(parents=True)
    masks.mkdir()
    if media_dir is not None:
        for n in ("cat_sunglasses.jpg", "street_portrait.png"):
            shutil.copy(media_dir / n, imgs / n)
            shutil.copy(media_dir / (n.rsplit(".", 1)[0] + ".txt"), imgs / (n.rsplit(".", 1)[0] + ".txt"))
    else:
        rng = np.random.default_rng(5)
        for n in ("p", "q"):
            _png(imgs / f"{n}.png", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
            (imgs / f"{n}.txt").write_text(f"synthetic {n}")
    for p in sorted(imgs.iterdir()):
        if p.suffix != ".txt":
            w, h = Image.open(p).size
            m = np.zeros((h, w), np.uint8)
            m[:, : w // 2] = 255
            _png(masks / f"{p.stem}.png", m)
    return imgs, masks


def test_tiny_training_run_with_masks(tmp_path, tiny_dir, request):
    """Three steps on images with masks: an all-ones mask trains bit-identically to no mask, a
    half mask trains differently (and finitely)."""
    try:
        media = request.getfixturevalue("media_dir")
    except pytest.skip.Exception:
        media = None  # synthetic PNGs instead
    flags = _flags(tiny_dir)
    imgs, masks = _media_or_synthetic(tmp_path, media)
    ones = tmp_path / "ones"
    ones.mkdir()
    for p in masks.iterdir():
        _png(ones / p.name, np.full(np.asarray(Image.open(p)).shape, 255, np.uint8))
    runs = {}
    for name, mask_dir in (("none", None), ("ones", ones), ("half", masks)):
        toml = tmp_path / f"{name}.toml"
        toml.write_text(f"[general]\nresolution = [32, 32]\nenable_bucket = true\n[[datasets]]\n"
                        f"image_directory = \"{imgs}\"\ncache_directory = \"{tmp_path / ('c_' + name)}\"\n"
                        + (f"mask_directory = \"{mask_dir}\"\n" if mask_dir else ""))
        assert _cache(toml, tiny_dir) == 0
        assert cache_text_main(["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer",
                                flags["--t5_tokenizer"], "--no_progress"]) == 0
        runs[name] = _train(flags, toml, tmp_path / f"out_{name}")
    (st_none, w_none), (st_ones, w_ones), (st_half, w_half) = runs["none"], runs["ones"], runs["half"]
    assert [x[2] for x in st_ones.losses] == [x[2] for x in st_none.losses]
    assert w_ones.keys() == w_none.keys() and all(torch.equal(w_ones[k], w_none[k]) for k in w_none)
    assert all(np.isfinite(x[2]) for x in st_half.losses)
    assert [x[2] for x in st_half.losses] != [x[2] for x in st_none.losses]
    assert any(not torch.equal(w_half[k], w_none[k]) for k in w_none)


# ---- I2V: the given first frame out of the loss -----------------------------------------------


def test_i2v_mask_first_frame_leaves_the_given_frame_out_of_the_loss():
    from wanlora.conditioning import conditioning_for, i2v_mask

    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 3, 4, 4, generator=g)  # 3 latent frames = 9 pixel frames
    for task, known in (("i2v-A14B", (0,)), ("flf2v-14B", (0, -1))):
        y = torch.cat([i2v_mask(9, 4, 4, known), torch.randn(16, 3, 4, 4, generator=g)])[None].expand(2, -1, -1, -1, -1)
        batch = {"latents": x0, "context": [torch.zeros(2, 8)] * 2, "y": y, "clip_fea": torch.zeros(2, 514, 8)}
        cond = conditioning_for(task, mask_given_frames=True)
        inputs = cond.training_inputs(batch, x0, x0, torch.zeros(2), torch.Generator())
        # frame 0 is given whole; FLF2V's last latent frame holds 3 unknown pixel frames, so it stays
        assert inputs.loss_mask.flatten(1).tolist() == [[0.0, 1.0, 1.0]] * 2
        assert conditioning_for(task).training_inputs(batch, x0, x0, torch.zeros(2), torch.Generator()).loss_mask is None
        one = {**batch, "latents": x0[:, :, :1], "y": y[:, :, :1]}
        assert cond.training_inputs(one, x0[:, :, :1], x0[:, :, :1], torch.zeros(2), torch.Generator()).loss_mask is None
        # the loss is the mean over frames 1.. (and a dataset mask multiplies in)
        sampler = flow.TimestepDistribution("uniform")
        model = lambda x, t, c, yy, clip: 0.5 * x  # noqa: E731
        loss, _ = flow_matching_loss(model, batch, sampler, 0, 1000, torch.Generator().manual_seed(4), "cpu",
                                     conditioning=cond)
        gen = torch.Generator().manual_seed(4)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = (sampler.sample(2, gen, 0, 1000) / 1000).view(2, 1, 1, 1, 1)
        err = (0.5 * ((1 - sigma) * x0 + sigma * noise) - (noise - x0)) ** 2
        assert loss.item() == pytest.approx(err[:, :, 1:].mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="--i2v_mask_first_frame is for --task i2v-A14B.*t2v-A14B has no y"):
        conditioning_for("t2v-A14B", mask_given_frames=True)
    with pytest.raises(ValueError, match="ti2v-5B has no y: use --ti2v_first_frame"):
        conditioning_for("ti2v-5B", mask_given_frames=True)


def test_the_flag_reaches_the_run_plan():
    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import plan_run

    base = ["--dit", "d", "--expert", "low", "--dataset_config", "ds.toml", "--output_dir", "out",
            "--i2v_mask_first_frame"]
    assert plan_run(parse_config(["--task", "i2v-A14B", *base]))[3].mask_given_frames
    with pytest.raises(ValueError, match="--i2v_mask_first_frame is for --task"):
        plan_run(parse_config(["--task", "t2v-A14B", *base]))


def test_mp4_and_static_masks_of_clips_and_the_debug_view(tmp_path, tiny_dir, capsys):
    """A clip with a per-frame MP4 mask and one with a single PNG for all frames; --debug_mode
    writes each mask beside the frames it weights."""
    from wanlora.video_io import write_video

    rng = np.random.default_rng(3)
    clips, masks = tmp_path / "clips", tmp_path / "masks"
    for name in ("moving", "still"):
        write_video(clips / f"{name}.mp4", rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8), fps=16)
        (clips / f"{name}.txt").write_text(name)
    levels = [40 * (k % 5) + 30 for k in range(9)]
    write_video(masks / "moving.mp4", np.stack([np.full((32, 48, 3), v, np.uint8) for v in levels]), fps=16)
    still = np.zeros((32, 48), np.uint8)
    still[:, 24:] = 255
    _png(masks / "still.png", still)
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\nresolution = [48, 32]\n[[datasets]]\nvideo_directory = "clips"\n'
                    'cache_directory = "cv"\nmask_directory = "masks"\ntarget_frames = [9]\n')
    assert _cache(toml, tiny_dir) == 0
    moving = load_file(str(next((tmp_path / "cv").glob("moving_*.safetensors"))))["mask"]
    want = [levels[0], sum(levels[1:5]) / 4, sum(levels[5:9]) / 4]
    assert moving.shape == (1, 3, 4, 6)
    assert moving[0].mean(dim=(1, 2)).tolist() == pytest.approx([v / 255 for v in want], abs=2 / 255)  # H.264
    s = load_file(str(next((tmp_path / "cv").glob("still_*.safetensors"))))["mask"]
    assert torch.equal(s, torch.cat([torch.zeros(1, 3, 4, 3), torch.ones(1, 3, 4, 3)], dim=3))
    capsys.readouterr()
    assert cache_latents_main(["--dataset_config", str(toml), "--task", "t2v-A14B", "--debug_mode", "image",
                               "--num_workers", "0", "--no_progress"]) == 0
    shown = sorted(p.name for p in (tmp_path / "cv" / "debug").iterdir())
    assert shown == ["moving_00000-009_48x32_wan21", "moving_00000-009_48x32_wan21_mask",
                     "still_00000-009_48x32_wan21", "still_00000-009_48x32_wan21_mask"]
    frame = np.asarray(Image.open(tmp_path / "cv" / "debug" / "still_00000-009_48x32_wan21_mask" / "frame_00004.png"))
    assert np.array_equal(frame[..., 0], still)
