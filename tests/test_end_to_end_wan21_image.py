"""The Wan2.1 image models end to end on the tiny models and real photos: cache with the CLIP image
encoder, train a few steps, generate from a real photo (FLF2V: a first and a last photo), convert.

The commands are the recipes of docs/training.md (:data:`wanlora.tools.quickstart.RECIPES`), run as
subprocesses exactly as a user types them. The I2V-14B recipe caches with the official CLIP ``.pth``
and generates with ComfyUI's ``clip_vision_h.safetensors``; the FLF2V recipe the other way round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open

from tiny_runs import file_metadata
from wanlora.tools.demo import run_recipe, write_dataset_toml
from wanlora.tools.quickstart import FLF2V_14B, I2V_14B


def _clips(media_dir: Path, dst: Path) -> Path:
    videos = dst / "videos"
    videos.mkdir(parents=True)
    for f in media_dir.glob("*.mp4"):
        shutil.copy(f, videos / f.name)
        shutil.copy(f.with_suffix(".txt"), videos / f.with_suffix(".txt").name)
    return videos


def _decode(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as c:
        frames = list(c.decode(c.streams.video[0]))
        return len(frames), frames[0].height, frames[0].width


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [I2V_14B, FLF2V_14B], ids=lambda r: r.task)
def test_wan21_image_model_on_real_media(recipe, media_dir, tmp_path):
    from PIL import Image

    work, models = tmp_path / "work", tmp_path / "models"
    work.mkdir()
    write_dataset_toml(work, _clips(media_dir, tmp_path / "data"), None, resolution=(64, 64), frames=17)
    Image.open(media_dir / "cat_sunglasses.jpg").resize((96, 128)).save(work / "first_frame.png")
    Image.open(media_dir / "elf_portrait.jpg").save(work / "last_frame.png")  # another size: cropped to fit
    run_recipe(recipe, {"MODELS": str(models), "WORK": str(work)})

    n = 2 if recipe.task == "flf2v-14B" else 1
    latents = [f for f in sorted((work / "cache").rglob("*.safetensors"))
               if file_metadata(f).get("format", "").startswith("wanlora.latent_cache")]
    assert len(latents) == 2  # one head window per clip
    clip_ids = set()
    for cache in latents:
        meta = file_metadata(cache)
        with safe_open(str(cache), framework="pt") as f:
            x, y, fea = f.get_tensor("latents"), f.get_tensor("y"), f.get_tensor("clip_fea")
        assert y.shape == (20, *x.shape[1:]) and fea.shape == (257 * n, 160) and fea.dtype == torch.float32
        assert (y[:4, 0] == 1).all() and (y[:4, 1:-1] == 0).all()
        assert bool((y[3, -1] == 1).all()) == (n == 2)  # FLF2V: the last pixel frame is given too
        assert meta["task"] == recipe.task and meta["has_clip_fea"] == "1"
        clip_ids.add(meta["clip"])
    assert len(clip_ids) == 1 and next(iter(clip_ids)).startswith("clip-160x2-")

    name = {"i2v-14B": "myi2v14b", "flf2v-14B": "myflf2v"}[recipe.task]
    lora = work / "output" / f"{name}.safetensors"
    meta = file_metadata(lora)
    assert meta["wan.task"] == recipe.task
    assert meta["modelspec.architecture"] == {"i2v-14B": "wan-2_1-image2video-14b/lora",
                                              "flf2v-14B": "wan-2_1-flf2v-14b/lora"}[recipe.task]
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
    # musubi-tuner's targets: the image cross-attention (k_img, v_img) is trained too
    assert any("cross_attn_k_img.lora_down" in k for k in keys) and any("cross_attn_v_img" in k for k in keys)
    assert len([k for k in keys if k.endswith(".lora_down.weight")]) == 2 * 12

    (mp4,) = (work / "generated").glob("*.mp4")
    frames, h, w = _decode(mp4)
    assert frames == 17 and h > w, "a portrait first frame gives a portrait video"
    sidecar = json.loads(mp4.with_suffix(".json").read_text())
    assert sidecar["seed"] == 42 and sidecar["image_path"].endswith("first_frame.png")
    if n == 2:
        assert sidecar["end_image_path"].endswith("last_frame.png")
    with safe_open(str(work / "comfy" / f"{name}.safetensors"), framework="pt") as f:
        comfy = list(f.keys())
    assert any(k.startswith("diffusion_model.blocks.0.cross_attn.k_img.") for k in comfy)
