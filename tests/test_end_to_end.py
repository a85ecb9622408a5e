"""The whole job as the README shows it, on real clips and photos from ../shared/media.

The commands come from :mod:`wanlora.tools.quickstart` — the same recipes the README and the training
guide are generated from (``test_docs_show_the_tested_commands`` keeps them in step) and that
``make demo`` runs. Each command runs as a subprocess, exactly as a user types it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest
from safetensors import safe_open

from tiny_runs import file_metadata
from wanlora.tools.demo import run_recipe, write_dataset_toml, write_prompts
from wanlora.tools.quickstart import I2V_ONE_EXPERT, RECIPES, T2V_BOTH_EXPERTS, missing_blocks

ROOT = Path(__file__).resolve().parents[1]


def _work_from_media(media_dir: Path, root: Path, images: bool = True) -> tuple[Path, Path]:
    """Copy the real clips (and, with ``images``, the photos) with their captions under
    ``root/data`` and write ``root/work/dataset.toml`` for them (64x64, 17-frame head windows).
    Returns ``(work, models)``: the recipe's WORK folder and the MODELS folder it fills."""
    videos, photos = root / "data" / "videos", root / "data" / "images"
    videos.mkdir(parents=True)
    photos.mkdir(parents=True)
    for f in media_dir.iterdir():
        dst = videos if f.suffix == ".mp4" else photos if images and f.suffix in (".jpg", ".png") else None
        if dst is not None:
            shutil.copy(f, dst / f.name)
            shutil.copy(f.with_suffix(".txt"), dst / f.with_suffix(".txt").name)
    work = root / "work"
    work.mkdir()
    write_dataset_toml(work, videos, photos if images else None, resolution=(64, 64), frames=17)
    return work, root / "models"


def _caches(work: Path) -> tuple[list[Path], list[Path]]:
    """(latent caches, text caches) under ``work/cache``, told apart by their recorded format."""
    files = sorted((work / "cache").rglob("*.safetensors"))
    kinds = {f: file_metadata(f).get("format", "") for f in files}
    return ([f for f in files if kinds[f].startswith("wanlora.latent_cache")],
            [f for f in files if kinds[f].startswith("wanlora.text_cache")])


def _decode_mp4(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f for f in c.decode(stream)]
        return len(frames), frames[0].height, frames[0].width, float(stream.average_rate)


def test_docs_show_the_tested_commands():
    for doc in {r.doc for r in RECIPES.values()}:
        assert missing_blocks(ROOT / doc) == [], (
            f"{doc} no longer shows the tested commands; paste the output of "
            "`python -m wanlora.tools.quickstart --sync .`")


@pytest.mark.slow
def test_t2v_a14b_both_experts_on_real_media(media_dir, tmp_path):
    work, models = _work_from_media(media_dir, tmp_path)
    write_prompts(work, ["a skeleton dances on a black background"], size=(64, 64), frames=17,
                  steps=4)
    run_recipe(T2V_BOTH_EXPERTS, {"MODELS": str(models), "WORK": str(work)})

    # caches: one latent cache per clip window and photo (head windows: one per clip), one text
    # cache per caption
    latents, texts = _caches(work)
    assert len([c for c in latents if "video" in c.parts]) == 2
    assert len([c for c in latents if "image" in c.parts]) == 3
    assert len(texts) == 5

    # two LoRA files, one per expert, self-describing
    out = work / "output"
    for expert, lo, hi in (("high_noise", 875, 1000), ("low_noise", 0, 875)):
        meta = file_metadata(out / f"mylora_{expert}.safetensors")
        assert meta["wan.task"] == "t2v-A14B"
        assert meta["wan.expert"] == expert
        assert [float(x) for x in meta["modelspec.timestep_range"].split(",")] == [lo, hi]
        assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 8
    # samples during training
    assert sorted((out / "sample").glob("*.mp4")), "no training samples were written"
    # the generated video: 17 frames of 64x64 at the task's 16 fps
    (mp4,) = (work / "generated").glob("*.mp4")
    assert _decode_mp4(mp4) == (17, 64, 64, 16.0)
    sidecar = json.loads(mp4.with_suffix(".json").read_text())
    assert sidecar["seed"] == 42
    # the ComfyUI file
    with safe_open(str(work / "comfy" / "mylora_high_noise.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)


@pytest.mark.slow
def test_i2v_a14b_one_expert_on_real_media(media_dir, tmp_path):
    from PIL import Image

    work, models = _work_from_media(media_dir, tmp_path, images=False)
    Image.open(media_dir / "cat_sunglasses.jpg").resize((96, 128)).save(work / "first_frame.png")
    run_recipe(I2V_ONE_EXPERT, {"MODELS": str(models), "WORK": str(work)})

    # every latent cache carries the I2V conditioning: 4 mask + 16 image-latent channels
    latents, texts = _caches(work)
    assert len(latents) == 2 and len(texts) == 2
    for cache in latents:
        with safe_open(str(cache), framework="pt") as f:
            x, y = f.get_tensor("latents"), f.get_tensor("y")
        assert x.shape[0] == 16 and y.shape == (20, *x.shape[1:])
        assert (y[:4, 0] == 1).all() and (y[:4, 1:] == 0).all()  # first latent frame is given
    meta = file_metadata(work / "output" / "myi2v.safetensors")
    assert meta["wan.task"] == "i2v-A14B" and meta["wan.expert"] == "low_noise"
    (mp4,) = (work / "generated").glob("*.mp4")
    frames, h, w, fps = _decode_mp4(mp4)
    assert frames == 17 and fps == 16.0 and h > w, "a portrait image gives a portrait video"
    assert list((work / "comfy").glob("myi2v*.safetensors"))
