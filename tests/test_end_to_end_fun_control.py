"""Wan2.1-Fun-Control end to end on the tiny models and the real clips: cache the latents with a
control clip per video, train a few steps, generate with ``--control_path``, convert / merge.

The control clips are made from the real clips of ``../shared/media`` (the inverted gray frames, a
stand-in for a depth or edge video): one as an MP4, the other as a folder of PNG frames, the two
forms ``control_directory`` takes. The commands are the recipes of ``docs/fun_control.md``
(:data:`wanlora.tools.quickstart.RECIPES`), run as subprocesses exactly as a user types them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tiny_runs import file_metadata
from wanlora.tools.demo import run_recipe
from wanlora.tools.quickstart import I2V_14B_FC, T2V_1_3B_FC
from wanlora.video_io import probe_video, read_video_frames, write_images, write_video


def control_of(frames: np.ndarray) -> np.ndarray:
    """A control clip for a clip: its inverted gray frames, uint8 ``[F, H, W, 3]``."""
    gray = frames.astype(np.float32).mean(axis=3, keepdims=True)
    return np.repeat(255 - gray.round().astype(np.uint8), 3, axis=3)


def make_control_dataset(media_dir: Path, root: Path, frames: int = 17) -> Path:
    """Copy the real clips with captions to ``root/videos``, write their control clips to
    ``root/controls`` (one MP4, one folder of PNGs) and ``root/dataset.toml``. Returns the TOML."""
    videos, controls = root / "videos", root / "controls"
    videos.mkdir(parents=True)
    controls.mkdir()
    for k, f in enumerate(sorted(media_dir.glob("*.mp4"))):
        shutil.copy(f, videos / f.name)
        shutil.copy(f.with_suffix(".txt"), videos / f.with_suffix(".txt").name)
        info = probe_video(f)
        ctrl = control_of(read_video_frames(f, range(min(info.frame_count, 40)), size=(96, 64)))
        if k == 0:
            write_video(controls / f.name, ctrl, fps=16)
        else:
            write_images(controls / f.stem, ctrl)
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = [64, 48]\ncaption_extension = \".txt\"\nbatch_size = 1\n\n"
        f"[[datasets]]\nvideo_directory = \"{videos.as_posix()}\"\ncontrol_directory = \"{controls.as_posix()}\"\n"
        f"cache_directory = \"{(root / 'cache').as_posix()}\"\ntarget_frames = [{frames}]\n"
        "frame_extraction = \"head\"\n", encoding="utf-8")
    return toml


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [T2V_1_3B_FC, I2V_14B_FC], ids=lambda r: r.task)
def test_fun_control_on_real_media(recipe, media_dir, tmp_path):
    from PIL import Image

    work, models = tmp_path / "work", tmp_path / "models"
    work.mkdir()
    make_control_dataset(media_dir, work)
    clip = sorted(media_dir.glob("*.mp4"))[0]
    ctrl = control_of(read_video_frames(clip, range(17), size=(64, 48)))
    write_video(work / "control.mp4", ctrl, fps=16)
    write_images(work / "control_frames", ctrl)
    Image.open(media_dir / "cat_sunglasses.jpg").resize((48, 64)).save(work / "first_frame.png")
    run_recipe(recipe, {"MODELS": str(models), "WORK": str(work)})

    caches = [f for f in sorted((work / "cache").glob("*.safetensors"))
              if file_metadata(f).get("format", "").startswith("wanlora.latent_cache")]
    assert len(caches) == 2  # one head window per clip
    i2v = recipe.task == "i2v-14B-FC"
    for cache in caches:
        meta = file_metadata(cache)
        with safe_open(str(cache), framework="pt") as f:
            x, c = f.get_tensor("latents"), f.get_tensor("latents_control")
            assert set(f.keys()) == ({"latents", "latents_control", "start_latent", "clip_fea"} if i2v
                                     else {"latents", "latents_control"})
            if i2v:
                assert f.get_tensor("start_latent").shape == (16, 1, *x.shape[2:])
        assert c.shape == x.shape == (16, 5, 6, 8) and c.dtype == torch.float32
        assert not torch.equal(c, x)  # the control clip, not the target
        assert meta["has_latents_control"] == "1" and json.loads(meta["control"])["source"].startswith(
            str(work / "controls"))

    name = {"t2v-1.3B-FC": "myfc", "i2v-14B-FC": "myfci2v"}[recipe.task]
    lora = file_metadata(work / "output" / f"{name}.safetensors")
    assert lora["wan.task"] == recipe.task
    assert lora["modelspec.architecture"].startswith("wan-2_1-fun-control-")
    (mp4,) = (work / "generated").glob("*.mp4")
    info = probe_video(mp4)
    assert info.frame_count == 17
    assert (info.width, info.height) == ((48, 64) if i2v else (64, 48))  # i2v: the portrait image's aspect
    sidecar = json.loads(mp4.with_suffix(".json").read_text())
    assert sidecar["control_path"].endswith("control_frames" if i2v else "control.mp4")
    if i2v:
        assert (work / "merged" / "dit.safetensors").is_file()
    else:
        assert (work / "comfy" / f"{name}.safetensors").is_file()
