"""The training dataset: shapes, buckets, determinism, resume, DataLoader workers, missing caches."""

from __future__ import annotations

import json

import pytest
import torch

from wanlora.commands.cache_latents import main as cache_latents_main
from wanlora.commands.cache_text import main as cache_text_main
from wanlora.dataset import MissingCachesError, TrainingDataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, link_media, tiny_dir):
    root = tmp_path_factory.mktemp("train")
    link_media(root / "clips", "skeleton_dance.mp4", "studio_host.mp4")
    link_media(root / "imgs", "cat_sunglasses.jpg", "elf_portrait.jpg", "street_portrait.png")
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


def order(ds, epochs=1, start=0):
    """Batch keys at global positions ``start .. epochs * len(ds) - 1`` (batch i of epoch e is
    ``ds[e * len(ds) + i]``)."""
    return [ds[p]["keys"] for p in range(start, epochs * len(ds))]


def test_batches_shapes_and_buckets(cached):
    ds = TrainingDataset(cached, task="i2v-A14B", seed=0)
    # videos: 2 items x 2 windows; images: 3 items x 2 repeats
    assert ds.num_samples == 4 + 6
    seen = []
    for b in (ds[p] for p in range(len(ds))):
        lat, y, ctx, keys = b["latents"], b["y"], b["context"], b["keys"]
        assert lat.dtype == torch.float32 and lat.dim() == 5 and lat.shape[1] == 16
        assert y.shape == (lat.shape[0], 20) + lat.shape[2:]
        assert len(ctx) == len(keys) == lat.shape[0] and all(c.dim() == 2 and c.shape[1] == 32 for c in ctx)
        assert len({(k.split("_")[-3], k.split("_")[-2]) for k in keys}) == 1  # one frames+size bucket
        seen += keys
    on_disk = {p.name[: -len(".safetensors")] for d in ("cv", "ci") for p in (cached.parent / d).glob("*_wan21.safetensors")}
    assert set(seen) == on_disk and len(on_disk) == 7
    assert sum(k.startswith("cat_sunglasses") for k in seen) == 2  # num_repeats


def test_deterministic_and_resumable(cached):
    a = TrainingDataset(cached, task="i2v-A14B", seed=3)
    full = order(a, epochs=2)
    b = TrainingDataset(cached, task="i2v-A14B", seed=3)
    assert order(b, epochs=2) == full
    assert order(TrainingDataset(cached, task="i2v-A14B", seed=4), epochs=1) != full[: len(a)]
    assert full[: len(a)] != full[len(a):]  # a new order each epoch
    # resume: a fresh dataset continues from a position alone (the trainer's skip_first_batches)
    d = TrainingDataset(cached, task="i2v-A14B", seed=3)
    assert order(d, epochs=2, start=len(a) + 2) == full[len(a) + 2:]


def test_dataloader_workers_same_batches(cached):
    a = TrainingDataset(cached, task="i2v-A14B", seed=7)
    b = TrainingDataset(cached, task="i2v-A14B", seed=7)
    positions = range(len(a), 2 * len(a))  # epoch 1, as the trainer's sampler gives them
    ref = [a[p] for p in positions]
    loader = torch.utils.data.DataLoader(b, batch_size=None, sampler=positions, num_workers=2)
    got = list(loader)
    assert [x["keys"] for x in got] == [x["keys"] for x in ref]
    assert all(torch.equal(x["latents"], y["latents"]) and torch.equal(x["y"], y["y"]) for x, y in zip(got, ref))


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
    assert "y" not in ds[0]


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


def _replace_caption(cap, text):
    """Swap the caption symlink (into ../shared/media) for a file with ``text`` (None: remove it);
    returns the restore function. The shared media is never written."""
    target = cap.resolve()
    cap.unlink()
    if text is not None:
        cap.write_text(text)

    def restore():
        cap.unlink(missing_ok=True)
        cap.symlink_to(target)

    return restore


def test_edited_caption_reported_stale_with_the_missing(cached):
    """A caption edited after wanlora-cache-text is a stale text cache (from its header's caption),
    listed with the missing caches and the command that rebuilds it."""
    imgs = cached.parent / "imgs"
    restore = _replace_caption(imgs / "elf_portrait.txt", "an elf, edited after caching")
    moved = [(p, p.with_name("away-" + p.name)) for p in (cached.parent / "cv").glob("studio_host_*")]
    for p, q in moved:
        p.rename(q)
    try:
        with pytest.raises(MissingCachesError) as ei:
            TrainingDataset(cached, task="i2v-A14B")
        msg = str(ei.value)
        assert any(p.endswith("elf_portrait.jpg: text cache elf_portrait_wan_te.safetensors is stale: the caption "
                              "changed since wanlora-cache-text ran (it rebuilds stale caches)") for p in ei.value.problems)
        assert any("studio_host.mp4: no latent cache" in p for p in ei.value.problems)
        assert "\ncreate the caches with:\n" in msg and "wanlora-cache-text --dataset_config" in msg
        assert "wanlora-cache-latents --dataset_config" in msg
    finally:
        restore()
        for p, q in moved:
            q.rename(p)
    TrainingDataset(cached, task="i2v-A14B")  # the original caption matches its cache again


def test_item_problems_heading(cached):
    """Items with problems (no caption) are followed by one clean instruction and both commands."""
    restore = _replace_caption(cached.parent / "imgs" / "cat_sunglasses.txt", None)
    try:
        with pytest.raises(MissingCachesError) as ei:
            TrainingDataset(cached, task="i2v-A14B")
        msg = str(ei.value)
        assert len(ei.value.problems) == 1 and "cat_sunglasses.jpg: no caption" in msg
        assert "\nfix the items above (captions, file names), then create their caches with:\n" in msg
        assert "create the caches with:" not in msg and "again" not in msg
        assert [c.split()[0] for c in ei.value.commands] == ["wanlora-cache-latents", "wanlora-cache-text"]
    finally:
        restore()


def test_edited_dataset_options_make_the_latent_caches_stale(cached, tmp_path):
    """A resolution or frame change in the TOML after wanlora-cache-latents is caught like an edited
    caption: every latent cache made with the old options is named, with what changed."""
    edited = tmp_path / "d.toml"
    text = cached.read_text().replace("resolution = [32, 32]", "resolution = [64, 64]")
    for d in ("clips", "imgs", "cv", "ci"):
        text = text.replace(f'"{d}"', f'"{cached.parent / d}"')
    edited.write_text(text.replace("target_frames = [1, 5]", "target_frames = [1, 9]"))
    with pytest.raises(MissingCachesError) as ei:
        TrainingDataset(edited, task="i2v-A14B")
    stale = [p for p in ei.value.problems if "stale: the dataset TOML changed" in p]
    assert len(stale) == 7, ei.value.problems
    assert any("cat_sunglasses_00000-001_32x32_wan21.safetensors: stale: the dataset TOML changed since "
               "wanlora-cache-latents ran (resolution [32, 32] -> [64, 64]); it rebuilds stale caches" in p
               for p in stale)
    assert any("(resolution [32, 32] -> [64, 64], target_frames [1, 5] -> [1, 9])" in p for p in stale)
    assert "wanlora-cache-latents --dataset_config" in str(ei.value)


def test_nan_in_a_cached_latent_names_the_file(cached, tmp_path):
    from safetensors.torch import load_file, save_file

    ds = TrainingDataset(cached, task="i2v-A14B", seed=0, shuffle=False)
    victim = ds.samples[0].latent
    original = victim.read_bytes()
    try:
        from wanlora.dataset.caches import read_cache_metadata

        t = load_file(str(victim))
        t["latents"][0, 0, 0, 0] = float("nan")
        save_file(t, str(victim), metadata=read_cache_metadata(victim))
        with pytest.raises(ValueError) as ei:
            ds.load_batch([ds.samples[0]])
        assert str(ei.value).startswith(f"{victim}: the cached latent holds NaN or Inf values")
        assert "run wanlora-cache-latents again" in str(ei.value) and "\n" not in str(ei.value)
    finally:
        victim.write_bytes(original)
