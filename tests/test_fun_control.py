"""Wan2.1-Fun-Control: the conditioning layout, the cache equal to what generation builds, and the
user errors for missing or mismatched control clips (dataset config, items, caching, generate).

Layout (VideoX-Fun ``pipeline_wan_fun_control.py``): the DiT sees ``[x 16 | control latent 16 |
start latent 16]``; the start latent sits in latent frame 0 only, and only with an image and more
than one latent frame; without an image the CLIP features are zeros ``[257, 1280]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanlora.conditioning import (
    BLANK_CLIP_SHAPE,
    KINDS,
    FunControl,
    FunControlImage,
    conditioning_for,
    control_pixels,
    frames_to_video,
    fun_control_y,
    i2v_y,
)
from wanlora.dataset.config import DatasetConfigError, DatasetConfigWarning, load_dataset_config
from wanlora.dataset.items import list_items
from wanlora.dataset.latent_caching import plan_latent_caches
from wanlora.inference.prompts import parse_prompt_line
from wanlora.models import load_vae
from wanlora.tasks import TASKS
from wanlora.video_io import write_images, write_video

torch.set_num_threads(1)


def _frames(n: int, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth synthetic frames uint8 ``[n, h, w, 3]`` (a moving gradient)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.stack([(xx * 5 + k * 9 + seed * 40) % 256, (yy * 7 + k * 3) % 256, (xx + yy + k * 11) % 256], -1)
           for k in range(n)]
    return np.asarray(out, dtype=np.uint8)


# ---- the task table's choice -------------------------------------------------------------------------


def test_fun_control_tasks_and_kinds():
    for name, cls in (("t2v-1.3B-FC", FunControl), ("t2v-14B-FC", FunControl), ("i2v-14B-FC", FunControlImage)):
        t, c = TASKS[name], conditioning_for(name)
        assert type(c) is cls and KINDS[t.conditioning] is cls and c.uses_control
        # the DiT takes x 16 + what y adds: control 16 + start 16; the CLIP branch is always there
        assert (t.in_channels, t.out_channels, t.clip_frames) == (48, 16, 1)
        assert t.in_channels - t.out_channels == 2 * t.latent_channels
    assert conditioning_for("t2v-1.3B-FC").cache_keys == ("latents_control",)
    assert conditioning_for("i2v-14B-FC").cache_keys == ("latents_control", "start_latent", "clip_fea")
    assert not conditioning_for("t2v-1.3B-FC").uses_clip and conditioning_for("i2v-14B-FC").uses_clip
    assert conditioning_for("i2v-14B-FC").requires_image and not conditioning_for("t2v-14B-FC").uses_image
    assert not any(KINDS[t.conditioning].uses_control for t in TASKS.values() if not t.name.endswith("-FC"))


def test_fun_control_y_layout():
    g = torch.Generator().manual_seed(0)
    control, start = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 1, 4, 6, generator=g)
    y = fun_control_y(control, start)
    assert y.shape == (2, 32, 3, 4, 6)
    assert torch.equal(y[:, :16], control)
    assert torch.equal(y[:, 16:, :1], start) and not y[:, 16:, 1:].any()
    assert not fun_control_y(control)[:, 16:].any()  # no start image: zeros
    # one latent frame (an image): the start latent is left out, as VideoX-Fun does
    assert not fun_control_y(control[:, :, :1], start)[:, 16:].any()


def test_training_inputs_take_the_cached_tensors():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=g)
    batch = {"latents_control": torch.randn(2, 16, 3, 4, 4, generator=g),
             "start_latent": torch.randn(2, 16, 1, 4, 4, generator=g),
             "clip_fea": torch.randn(2, 257, 40, generator=g)}
    t = torch.tensor([500.0, 20.0])
    a = conditioning_for("t2v-1.3B-FC").training_inputs(batch, x0, x0, t, g)
    assert torch.equal(a.y, fun_control_y(batch["latents_control"]))
    assert a.clip_fea.shape == (2, *BLANK_CLIP_SHAPE) and not a.clip_fea.any()
    b = conditioning_for("i2v-14B-FC").training_inputs(batch, x0, x0, t, g)
    assert torch.equal(b.y, fun_control_y(batch["latents_control"], batch["start_latent"]))
    assert torch.equal(b.clip_fea, batch["clip_fea"])
    assert a.loss_mask is None and torch.equal(a.timestep, t)


# ---- caching equals generation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(tiny_dir):
    return load_vae(tiny_dir("t2v-1.3B-FC") / "Wan2.1_VAE.pth", dtype=torch.float32, device="cpu")


def test_cached_control_latent_equals_generation(vae, tmp_path):
    frames = _frames(9)
    write_video(tmp_path / "control.mp4", frames, fps=16)
    write_images(tmp_path / "control_frames", frames)
    video, target = frames_to_video(frames)[None], frames_to_video(_frames(9, seed=1))[None]
    cached = FunControl().cache_tensors(vae, target, control=video)["latents_control"]
    # generation reads the folder of frames (lossless) at the same size: the same y
    px = control_pixels(tmp_path / "control_frames", 9, 32, 48)
    assert torch.equal(px, video[0])
    y = FunControl().encode_image(vae, None, 9, "cpu", control=px).y
    assert torch.equal(y, fun_control_y(cached)[0])
    # an MP4 is decoded (lossy) to the same shape
    assert control_pixels(tmp_path / "control.mp4", 5, 32, 48).shape == (3, 5, 32, 48)


def test_start_latent_equals_latent_frame_0_of_the_i2v_y(vae):
    # VideoX-Fun encodes the start image alone; musubi-tuner takes latent frame 0 of the I2V y:
    # the VAE being causal, the two agree
    video = frames_to_video(_frames(9))[None]
    cond = FunControlImage()

    class Clip:
        def encode(self, x):
            return torch.zeros(x.shape[0], 257, 40)

    out = cond.cache_tensors(vae, video, clip=Clip(), control=video)
    assert out["start_latent"].shape == (1, 16, 1, 4, 6) and out["clip_fea"].shape == (1, 257, 40)
    torch.testing.assert_close(out["start_latent"][:, :, 0], i2v_y(vae, video)[:, 4:, 0], rtol=0, atol=1e-5)


def test_control_pixels_errors(tmp_path):
    write_images(tmp_path / "short", _frames(5))
    with pytest.raises(ValueError, match=r"short: the control video has 5 frames but 9 are generated; give a "
                                         r"longer control video or a --video_length of at most 5"):
        control_pixels(tmp_path / "short", 9, 32, 48)
    with pytest.raises(ValueError, match="give --control_path"):
        control_pixels(None, 9, 32, 48)
    with pytest.raises(ValueError, match="missing.mp4"):
        control_pixels(tmp_path / "missing.mp4", 9, 32, 48)


# ---- the dataset: control_directory, control_path, and their errors ----------------------------------


def _dataset(root: Path, controls: dict[str, int | None], jsonl: bool = False, extra: str = "") -> Path:
    """Clips ``root/clips/{stem}.mp4`` of 9 frames with captions; control clips of the given frame
    counts (``None``: none) in ``root/controls``; returns the dataset TOML."""
    (root / "clips").mkdir(parents=True)
    (root / "controls").mkdir()
    lines = []
    for k, (stem, n) in enumerate(controls.items()):
        write_video(root / "clips" / f"{stem}.mp4", _frames(9, seed=k), fps=16)
        (root / "clips" / f"{stem}.txt").write_text(f"clip {stem}")
        if n is not None:
            write_video(root / "controls" / f"{stem}.mp4", _frames(n, seed=5), fps=16)
        rec = {"video_path": f"clips/{stem}.mp4", "caption": f"clip {stem}"}
        if n is not None:
            rec["control_path"] = f"controls/{stem}.mp4"
        lines.append(json.dumps(rec))
    source = 'video_jsonl_file = "meta.jsonl"' if jsonl else 'video_directory = "clips"\ncontrol_directory = "controls"'
    (root / "meta.jsonl").write_text("\n".join(lines) + "\n")
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [48, 32]\n\n[[datasets]]\n{source}\ncache_directory = "cache"\n'
                    f"target_frames = [9]\n{extra}")
    return toml


def test_fun_control_task_requires_control_directory(tmp_path):
    toml = _dataset(tmp_path, {"a": 9})
    toml.write_text(toml.read_text().replace('control_directory = "controls"\n', ""))
    with pytest.raises(DatasetConfigError, match=r"datasets\[0\]\.control_directory: required by --task "
                                                 r"t2v-1.3B-FC .* add control_directory"):
        load_dataset_config(toml, "t2v-1.3B-FC")
    toml.write_text(toml.read_text() + 'control_directory = "nowhere"\n')
    with pytest.raises(DatasetConfigError, match=r"control_directory: folder not found: .*nowhere"):
        load_dataset_config(toml, "t2v-1.3B-FC")


def test_control_directory_is_ignored_with_a_note_by_other_tasks(tmp_path):
    toml = _dataset(tmp_path, {"a": 9})
    with pytest.warns(DatasetConfigWarning, match="read by the Fun-Control tasks .* only; --task t2v-1.3B ignores it"):
        cfg = load_dataset_config(toml, "t2v-1.3B")
    assert cfg.datasets[0].control_directory is None and list_items(cfg.datasets[0])[0].control is None


def test_control_resolution_is_refused_with_the_reason(tmp_path):
    toml = _dataset(tmp_path, {"a": 9}, extra="control_resolution = [512, 512]\n")
    with pytest.raises(DatasetConfigError, match=r"control_resolution: not supported by wanlora \(Fun-Control "
                                                 r"concatenates the control latents"):
        load_dataset_config(toml, "t2v-1.3B-FC")


@pytest.mark.parametrize("jsonl", [False, True], ids=["control_directory", "jsonl"])
def test_items_find_their_control_clip_or_say_what_is_missing(tmp_path, jsonl):
    toml = _dataset(tmp_path, {"a": 9, "b": None}, jsonl=jsonl)
    ds = load_dataset_config(toml, "t2v-14B-FC").datasets[0]
    a, b = list_items(ds)
    assert a.problem is None and a.control == (tmp_path / "controls" / "a.mp4").resolve()
    assert b.control is None
    if jsonl:
        assert b.problem == f"{ds.source}:2: no \"control_path\" for b.mp4; add the control clip's path to the line"
    else:
        assert b.problem == (f"{tmp_path / 'clips' / 'b.mp4'}: no control clip b.* (or folder b/) in control_directory "
                             f"{tmp_path / 'controls'} (datasets[0]); add it, or remove the item")


def test_folder_of_frames_is_a_control_clip_and_two_candidates_are_an_error(tmp_path):
    toml = _dataset(tmp_path, {"a": None})
    write_images(tmp_path / "controls" / "a", _frames(9))
    ds = load_dataset_config(toml, "t2v-1.3B-FC").datasets[0]
    assert list_items(ds)[0].control == tmp_path / "controls" / "a"
    write_video(tmp_path / "controls" / "a.mov", _frames(9), fps=16)
    (item,) = list_items(ds)
    assert item.problem.endswith("several control clips for it in " + str(tmp_path / "controls") + ": a.mov, a; keep one")


def test_short_control_clip_fails_its_item_when_caching(tmp_path):
    toml = _dataset(tmp_path, {"a": 9, "b": 5})
    plan = plan_latent_caches(load_dataset_config(toml, "t2v-1.3B-FC"), "vae-id", "wan2.1")
    assert [j.item.stem for j in plan.jobs] == ["a"]
    ((src, why),) = plan.failed
    assert src == str(tmp_path / "clips" / "b.mp4")
    assert why == (f"{tmp_path / 'controls' / 'b.mp4'}: the control clip has 5 frames but {src} is trained on "
                   "frames up to 9 (datasets[0]); its frame k pairs with the video's frame k: give a control clip "
                   "as long as the video, or lower target_frames")


def test_edited_control_clip_makes_the_cache_stale(tmp_path):
    toml = _dataset(tmp_path, {"a": 9})
    cfg = load_dataset_config(toml, "t2v-1.3B-FC")
    (job,) = plan_latent_caches(cfg, "vae-id", "wan2.1").jobs
    meta = job.windows[0].metadata
    assert meta["has_latents_control"] == "1" and json.loads(meta["control"])["source"].endswith("controls/a.mp4")


# ---- generation: flags and prompt files ---------------------------------------------------------------


def test_prompt_file_takes_cn():
    spec = parse_prompt_line("a dancer --cn pose.mp4 --f 9")
    assert spec.control_path == "pose.mp4" and spec.frames == 9


def test_generate_flag_errors(tiny_dir, capsys):
    from wanlora.commands.generate import parse_args

    d = tiny_dir("t2v-1.3B-FC")
    flags = ["--dit", str(d / "diffusion_pytorch_model.safetensors"), "--vae", str(d / "Wan2.1_VAE.pth"),
             "--t5", str(d / "models_t5_umt5-xxl-enc-bf16.pth"), "--prompt", "x"]
    with pytest.raises(SystemExit):
        parse_args(["--task", "t2v-1.3B-FC", *flags])
    assert "--task t2v-1.3B-FC (Fun-Control) generates from a control video: give --control_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--task", "t2v-1.3B", "--control_path", "pose.mp4", *flags])
    assert "--control_path is for the Fun-Control tasks" in capsys.readouterr().err
    assert parse_args(["--task", "t2v-1.3B-FC", "--control_path", "pose.mp4", *flags]).request.control_path == "pose.mp4"


def test_image_dataset_caches_its_control_images(vae, tmp_path):
    from safetensors.torch import load_file

    from wanlora.dataset.latent_caching import cache_latents

    (tmp_path / "images").mkdir()
    (tmp_path / "controls").mkdir()
    for k, stem in enumerate(("a", "b")):
        Image.fromarray(_frames(1, 40, 56, seed=k)[0]).save(tmp_path / "images" / f"{stem}.png")
        (tmp_path / "images" / f"{stem}.txt").write_text(stem)
        Image.fromarray(_frames(1, 40, 56, seed=k + 5)[0]).save(tmp_path / "controls" / f"{stem}.jpg")
    (tmp_path / "d.toml").write_text('[[datasets]]\nimage_directory = "images"\ncontrol_directory = "controls"\n'
                                     'cache_directory = "cache"\nresolution = [48, 32]\n')
    cfg = load_dataset_config(tmp_path / "d.toml", "t2v-1.3B-FC")
    report = cache_latents(cfg, vae, progress=False)
    assert report.ok and report.cached == 2
    for stem in ("a", "b"):
        (path,) = (tmp_path / "cache").glob(f"{stem}_*.safetensors")
        t = load_file(str(path))
        assert t["latents_control"].shape == t["latents"].shape == (16, 1, 4, 6)
        # the control image, resized and cropped to the target's bucket like the target
        from wanlora.video_io import read_image, resize_cover_crop

        px = frames_to_video(np.asarray(resize_cover_crop(read_image(tmp_path / "controls" / f"{stem}.jpg"), (48, 32)))[None])
        torch.testing.assert_close(t["latents_control"], vae.encode(px[None])[0], rtol=0, atol=1e-5)
    # debug mode writes the control frames beside the target's
    cache_latents(cfg, None, progress=False, debug_mode="image")
    assert len(list((tmp_path / "cache" / "debug").glob("*_control"))) == 2


# ---- the pipeline builds the same y from --control_path -------------------------------------------------


def test_pipeline_prepare_reads_the_control_video(vae, tmp_path):
    from wanlora.inference.pipeline import GenerationRequest, WanPipeline

    frames = _frames(13, 40, 56)
    write_images(tmp_path / "pose", frames)
    pipe = WanPipeline("t2v-1.3B-FC", torch.nn.Identity(), vae=vae)  # prepare never runs a DiT
    ctx = [torch.zeros(3, 32)]
    req = GenerationRequest("x", height=32, width=48, frames=9, control_path=str(tmp_path / "pose"))
    p = pipe.prepare(req, ctx, ctx)
    # the first 9 frames, covered and center-cropped to 48x32, through the VAE
    want = vae.encode(control_pixels(tmp_path / "pose", 9, 32, 48)[None])
    assert torch.equal(p.y, fun_control_y(want)[0]) and p.y.shape == (32, 3, 4, 6)
    assert p.clip_fea.shape == BLANK_CLIP_SHAPE and not p.clip_fea.any()
    assert p.noise.shape == (16, 3, 4, 6)
    with pytest.raises(ValueError, match="give --control_path"):
        pipe.prepare(GenerationRequest("x", height=32, width=48, frames=9), ctx, ctx)
    with pytest.raises(ValueError, match="has 13 frames but 17 are generated"):
        pipe.prepare(GenerationRequest("x", height=32, width=48, frames=17, control_path=str(tmp_path / "pose")),
                     ctx, ctx)


def test_v1_1_control_checkpoints_are_refused_by_name():
    from wanlora.models.loading import describe_checkpoint

    base = {"patch_embedding.weight": 0, "head.head.weight": 0, "img_emb.proj.0.weight": 0}
    for extra in ("ref_conv.weight", "control_adapter.conv.weight"):
        msg = describe_checkpoint({**base, extra: 0})
        assert msg.startswith("a Wan2.1-Fun V1.1 Control DiT") and "use the V1.0 checkpoint" in msg
    assert describe_checkpoint(base) is None


def test_training_samples_take_the_control_video(tiny_dir, tmp_path):
    from wanlora.models.loading import load_dit
    from wanlora.training.validation import ValidationSampler

    task = "t2v-1.3B-FC"
    flags = json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]
    write_video(tmp_path / "pose.mp4", _frames(9), fps=16)
    pf = tmp_path / "prompts.txt"
    pf.write_text("a dancer --cn pose.mp4 --s 2 --d 3\n", encoding="utf-8")  # relative to the prompt file
    args = (task, pf, flags["--vae"], flags["--t5"], flags["--t5_tokenizer"])
    sampler = ValidationSampler(*args, output_dir=tmp_path, output_name="l", width=48, height=32, frames=5,
                                device="cpu")
    (req,) = sampler.requests()
    assert req.control_path == str(tmp_path / "pose.mp4")
    (s,) = sampler.sample(7, load_dit(flags["--dit"], task))
    assert s.frames.shape[0] == 5
    bad = tmp_path / "bad.txt"
    bad.write_text("a dancer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:1: t2v-1.3B-FC needs a control video: add --cn VIDEO"):
        ValidationSampler(task, bad, *args[2:], device="cpu")


def test_caching_without_task_follows_the_control_directory(tmp_path):
    # musubi-tuner caches control latents whenever the dataset has control clips
    from wanlora.commands.cache_latents import task_for_caching
    from wanlora.dataset.config import has_control_directory

    toml = _dataset(tmp_path, {"a": 9})
    assert has_control_directory(toml)
    assert not has_control_directory(toml.with_name("missing.toml"))
    assert task_for_caching(None, "wan2.1", control=True) == "t2v-14B-FC"
    assert task_for_caching(None, "wan2.1", i2v=True, clip=True, control=True) == "i2v-14B-FC"
    assert task_for_caching("t2v-1.3B-FC", None, control=True) == "t2v-1.3B-FC"
    with pytest.raises(ValueError, match="the Fun-Control models use the Wan2.1 VAE"):
        task_for_caching(None, "wan2.2", control=True)
