"""The training dataset: shapes, buckets, determinism, resume, DataLoader workers, missing caches."""

from __future__ import annotations

import json

import pytest
import torch

from wanlora.cache_latents import main as cache_latents_main
from wanlora.cache_text import main as cache_text_main
from wanlora.dataset import MissingCachesError, TrainingDataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, media_dir, tiny_dir):
    root = tmp_path_factory.mktemp("train")
    clips, imgs = root / "clips", root / "imgs"
    clips.mkdir()
    imgs.mkdir()
    for n in ("skeleton_dance", "studio_host"):
        (clips / f"{n}.mp4").symlink_to(media_dir / f"{n}.mp4")
        (clips / f"{n}.txt").symlink_to(media_dir / f"{n}.txt")
    for n in ("cat_sunglasses.jpg", "elf_portrait.jpg", "street_portrait.png"):
        (imgs / n).symlink_to(media_dir / n)
        (imgs / (n.rsplit(".", 1)[0] + ".txt")).symlink_to(media_dir / (n.rsplit(".", 1)[0] + ".txt"))
    toml = root / "d.toml"
    toml.write_text("""
[general]
resolution = [32, 32]
enable_bucket = true
[[datasets]]
video_directory = "clips"
cache_directory = "cv"
target_frames = [1, 5]
batch_size = 2
[[datasets]]
image_directory = "imgs"
cache_directory = "ci"
batch_size = 2
num_repeats = 2
""")
    flags = json.loads((tiny_dir("i2v-A14B") / "manifest.json").read_text())["flags"]
    assert cache_latents_main(["--dataset_config", str(toml), "--task", "i2v-A14B", "--vae", flags["--vae"],
                               "--num_workers", "0", "--no_progress"]) == 0
    assert cache_text_main(["--dataset_config", str(toml), "--t5", flags["--t5"],
                            "--t5_tokenizer", flags["--t5_tokenizer"], "--no_progress"]) == 0
    return toml


def order(ds, epochs=1):
    return [b["keys"] for b in ds.iterate(max_epochs=epochs)]


def test_batches_shapes_and_buckets(cached):
    ds = TrainingDataset(cached, task="i2v-A14B", seed=0)
    # videos: 2 items x 2 windows; images: 3 items x 2 repeats
    assert ds.num_samples == 4 + 6
    seen = []
    for b in ds.iterate(max_epochs=1):
        lat, y, ctx, keys = b["latents"], b["y"], b["context"], b["keys"]
        assert lat.dtype == torch.float32 and lat.dim() == 5 and lat.shape[1] == 16
        assert y.shape == (lat.shape[0], 20) + lat.shape[2:]
        assert len(ctx) == len(keys) == lat.shape[0] and all(c.dim() == 2 and c.shape[1] == 32 for c in ctx)
        assert len({(k.split("_")[-3], k.split("_")[-2]) for k in keys}) == 1  # one frames+size bucket
        seen += keys
    on_disk = {p.name[: -len(".safetensors")] for d in ("cv", "ci") for p in (cached.parent / d).glob("*_wan21.safetensors")}
    assert set(seen) == on_disk and len(on_disk) == 7
    assert sum(k.startswith("cat_sunglasses") for k in seen) == 2  # num_repeats
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["index"] == 0


def test_deterministic_and_resumable(cached):
    a = TrainingDataset(cached, task="i2v-A14B", seed=3)
    full = order(a, epochs=2)
    b = TrainingDataset(cached, task="i2v-A14B", seed=3)
    assert order(b, epochs=2) == full
    assert order(TrainingDataset(cached, task="i2v-A14B", seed=4), epochs=1) != full[: len(a)]
    assert full[: len(a)] != full[len(a):]  # a new order each epoch
    # stop after 3 batches, save, resume in a fresh dataset
    c = TrainingDataset(cached, task="i2v-A14B", seed=3)
    it = c.iterate(max_epochs=2)
    first = [next(it)["keys"] for _ in range(3)]
    state = c.state_dict()
    assert state["epoch"] == 0 and state["index"] == 3
    d = TrainingDataset(cached, task="i2v-A14B", seed=3)
    d.load_state_dict(state)
    assert first + order(d, epochs=2) == full


def test_dataloader_workers_same_batches(cached):
    a = TrainingDataset(cached, task="i2v-A14B", seed=7)
    b = TrainingDataset(cached, task="i2v-A14B", seed=7)
    ref = list(a.iterate(max_epochs=1))
    got = list(b.iterate(num_workers=2, max_epochs=1))
    assert [x["keys"] for x in got] == [x["keys"] for x in ref]
    assert all(torch.equal(x["latents"], y["latents"]) and torch.equal(x["y"], y["y"]) for x, y in zip(got, ref))
    assert b.state_dict()["epoch"] == 1


def test_missing_caches_reported_at_once(cached, tmp_path):
    cv = cached.parent / "cv"
    moved = []
    for p in list(cv.glob("studio_host_*")) + [cached.parent / "ci" / "elf_portrait_wan_te.safetensors"]:
        q = tmp_path / p.name
        p.rename(q)
        moved.append((q, p))
    try:
        with pytest.raises(MissingCachesError) as ei:
            TrainingDataset(cached, task="i2v-A14B")
        msg = str(ei.value)
        assert len(ei.value.problems) == 3  # studio_host: latents + text, elf_portrait: text
        assert "studio_host.mp4: no latent cache" in msg and "elf_portrait.jpg: no text cache" in msg
        assert f"wanlora-cache-latents --dataset_config {cached.resolve()} --task i2v-A14B" in msg
        assert "wanlora-cache-text --dataset_config" in msg
    finally:
        for q, p in moved:
            q.rename(p)
    # i2v caches (same VAE) also serve a t2v run, without "y"
    ds = TrainingDataset(cached, task="t2v-A14B")
    assert "y" not in next(iter(ds.iterate(max_epochs=1)))


def test_t2v_cache_rejected_for_i2v(cached, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from wanlora.io_utils import save_safetensors

    p = next((cached.parent / "ci").glob("elf_portrait_*_wan21.safetensors"))
    backup = tmp_path / p.name
    backup.write_bytes(p.read_bytes())
    with safe_open(str(p), "pt") as f:
        m = dict(f.metadata())
    m.update(has_y="0", task="t2v-A14B", conditioning="none")
    save_safetensors({"latents": load_file(str(p))["latents"]}, p, metadata=m)
    try:
        with pytest.raises(MissingCachesError, match="made for task t2v-A14B without the I2V conditioning") as ei:
            TrainingDataset(cached, task="i2v-A14B")
        assert "wanlora-cache-latents" in str(ei.value) and "--task i2v-A14B" in str(ei.value)
    finally:
        p.write_bytes(backup.read_bytes())
