"""wanlora-cache-latents without --task, as musubi-tuner users type it: the task from the --vae
file's kind and --i2v / --clip; the caches equal those of the explicit --task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from wanlora.commands.cache_latents import main, task_for_caching

torch.set_num_threads(1)


@pytest.mark.parametrize("vae, i2v, clip, task", [
    ("wan2.1", False, False, "t2v-A14B"),
    ("wan2.1", True, False, "i2v-A14B"),
    ("wan2.1", False, True, "i2v-14B"),
    ("wan2.1", True, True, "i2v-14B"),
    ("wan2.2", False, False, "ti2v-5B"),
    ("wan2.2", True, False, "ti2v-5B"),
])
def test_the_task_musubi_users_mean(vae, i2v, clip, task):
    assert task_for_caching(None, vae, i2v, clip) == task


def test_explicit_task_wins_and_conflicts_are_named():
    assert task_for_caching("t2v-1.3B", "wan2.1") == "t2v-1.3B"
    assert task_for_caching("i2v-A14B", None, i2v=True) == "i2v-A14B"
    with pytest.raises(ValueError, match="--i2v asks for the I2V conditioning but --task t2v-A14B has none"):
        task_for_caching("t2v-A14B", None, i2v=True)
    with pytest.raises(ValueError, match="--task is needed without --vae"):
        task_for_caching(None, None)
    with pytest.raises(ValueError, match="--clip: no task of the Wan2.2 VAE uses CLIP"):
        task_for_caching(None, "wan2.2", clip=True)


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    imgs, clips = tmp_path / "imgs", tmp_path / "clips"
    imgs.mkdir()
    for n in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(imgs / f"{n}.png")
        (imgs / f"{n}.txt").write_text(n)
    (clips / "walk").mkdir(parents=True)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(clips / "walk" / f"{k}.png")
    (clips / "walk.txt").write_text("walk")
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\nresolution = [32, 32]\nenable_bucket = true\n'
                    '[[datasets]]\nimage_directory = "imgs"\ncache_directory = "ci"\n'
                    '[[datasets]]\nvideo_directory = "clips"\ncache_directory = "cv"\ntarget_frames = [5]\n')
    return tmp_path, toml


def _caches(root):
    out = {}
    for p in sorted(root.glob("c?/*.safetensors")):
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
        out[p.name] = (load_file(str(p)), meta)
    return out


def _run(capsys, toml, vae, *extra):
    rc = main(["--dataset_config", str(toml), "--vae", vae, "--num_workers", "0", "--no_progress", *extra])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("tiny, flags, task", [
    ("t2v-A14B", (), "t2v-A14B"),
    ("i2v-A14B", ("--i2v",), "i2v-A14B"),
    ("ti2v-5B", (), "ti2v-5B"),
])
def test_without_task_writes_the_caches_of_the_explicit_task(dataset, tiny_dir, capsys, caplog, tiny, flags, task):
    root, toml = dataset
    vae = json.loads((tiny_dir(tiny) / "manifest.json").read_text())["flags"]["--vae"]
    with caplog.at_level("INFO", logger="wanlora.commands.cache_latents"):
        rc, out = _run(capsys, toml, vae, *flags)
    assert rc == 0, out
    assert f"no --task: caching for {task}" in caplog.text
    inferred = _caches(root)
    assert len(inferred) == 3 and all(m["task"] == task for _, m in inferred.values())
    # the explicit task finds them up to date, and rebuilt they are the same files
    rc, out = _run(capsys, toml, vae, "--task", task)
    assert rc == 0 and "0 cache file(s) written, 3 skipped as up to date" in out.out
    rc, out = _run(capsys, toml, vae, "--task", task, "--recache")
    explicit = _caches(root)
    assert explicit.keys() == inferred.keys()
    for name, (tensors, meta) in explicit.items():
        t0, m0 = inferred[name]
        assert m0 == meta and tensors.keys() == t0.keys()
        assert all(torch.equal(tensors[k], t0[k]) for k in tensors)
    assert ("y" in next(iter(explicit.values()))[0]) == (task == "i2v-A14B")


def test_command_line_errors_are_one_line(dataset, tiny_dir, capsys):
    root, toml = dataset
    rc = main(["--dataset_config", str(toml), "--debug_mode", "image", "--no_progress"])
    assert rc == 2 and "--task is needed without --vae" in capsys.readouterr().err
    vae22 = json.loads((tiny_dir("ti2v-5B") / "manifest.json").read_text())["flags"]["--vae"]
    rc = main(["--dataset_config", str(toml), "--vae", vae22, "--clip", "clip.pth", "--no_progress"])
    assert rc == 2 and "--clip: no task of the Wan2.2 VAE uses CLIP" in capsys.readouterr().err
    rc = main(["--dataset_config", str(toml), "--vae", vae22, "--task", "t2v-A14B", "--i2v"])
    assert rc == 2 and "--i2v asks for the I2V conditioning but --task t2v-A14B has none" in capsys.readouterr().err
    rc = main(["--dataset_config", str(toml), "--vae", str(root / "nope.pth")])
    assert rc == 2 and "--vae" in capsys.readouterr().err
