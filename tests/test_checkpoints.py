"""``--ckpt_dir``: official and diffusers folders, Hugging Face repo ids from a cache built here
(offline), a missing file as one line with exit status 2, and real downloads from a local HTTP
stand-in of the Hub (``HF_ENDPOINT``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fixtures import COMMIT, FixtureHub, copy_without, fill_hf_cache
from wanlora.models.checkpoints import (
    MissingModelFileError,
    download_command,
    is_repo_id,
    resolve_ckpt_dir,
    roles_for,
)
from wanlora.models.loading import CheckpointError, load_dit, load_state_dict

A14B = "Wan-AI/Wan2.2-T2V-A14B"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline, for in-process resolution."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def env_for(tmp_path: Path, offline: bool, endpoint: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=300)


def test_official_folder_gives_the_manifest_files(tiny_dir):
    for task in ("t2v-A14B", "t2v-1.3B", "ti2v-5B"):
        d = tiny_dir(task)
        files = resolve_ckpt_dir(d, task, roles_for(task))
        expected = json.loads((d / "manifest.json").read_text())["files"]
        if task == "ti2v-5B":  # shards at the top: the index names them (the folder holds other files)
            expected["dit"] = str(d / "diffusion_pytorch_model.safetensors.index.json")
        assert {r: str(p) for r, p in files.paths.items()} == expected
        assert files.layout == "official" and files.repo_id is None


def test_roles_and_download_command():
    assert roles_for("t2v-A14B", expert="high") == ("dit_high_noise", "vae", "t5", "t5_tokenizer")
    assert roles_for("t2v-A14B", ["vae"]) == ("vae",)
    assert roles_for("ti2v-5B", ["dit", "t5"]) == ("dit", "t5", "t5_tokenizer")
    with pytest.raises(ValueError, match="single DiT"):
        roles_for("t2v-1.3B", expert="low")
    assert download_command("t2v-A14B", ["dit_low_noise"]) == "wanlora-download --task t2v-A14B --expert low --only dit"
    assert download_command("t2v-1.3B", roles_for("t2v-1.3B"), "Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == \
        "wanlora-download --task t2v-1.3B --repo Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert is_repo_id(A14B) and not is_repo_id("no/such/thing") and not is_repo_id("plain")


def test_folder_missing_file_names_file_and_flag(tiny_dir, tmp_path):
    d = copy_without(tiny_dir("t2v-A14B"), tmp_path / "set", "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match=r"has no Wan2\.1_VAE\.pth \(--vae\) for --task t2v-A14B"):
        resolve_ckpt_dir(d, "t2v-A14B", roles_for("t2v-A14B"))
    # roles not asked for are not looked at (an explicit --vae flag would have filled it)
    assert "vae" not in resolve_ckpt_dir(d, "t2v-A14B", roles_for("t2v-A14B", ["dit", "t5"])).paths


def test_bad_ckpt_dir_values(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        resolve_ckpt_dir(tmp_path / "nope" / "deeper", "t2v-A14B", ["vae"])
    with pytest.raises(CheckpointError, match="a file, not a folder"):
        resolve_ckpt_dir(tiny_dir("t2v-1.3B") / "Wan2.1_VAE.pth", "t2v-1.3B", ["vae"])
    with pytest.raises(CheckpointError, match="holds the t2v-1.3B model, not t2v-A14B; pass --task t2v-1.3B"):
        resolve_ckpt_dir("Wan-AI/Wan2.1-T2V-1.3B", "t2v-A14B", ["vae"])
    with pytest.raises(ValueError, match="no model file role"):
        resolve_ckpt_dir(tiny_dir("t2v-1.3B"), "t2v-1.3B", ["dit_high_noise"])


def test_repo_id_from_cache_is_the_same_checkpoint(tiny_dir, hf_cache):
    d = tiny_dir("t2v-A14B")
    snap = fill_hf_cache(hf_cache, A14B, d)
    files = resolve_ckpt_dir(A14B, "t2v-A14B", roles_for("t2v-A14B"))
    assert files.repo_id == A14B and files.revision == COMMIT and files.layout == "official"
    assert files.paths["dit_high_noise"] == snap / "high_noise_model"
    assert files.paths["t5_tokenizer"] == snap / "google" / "umt5-xxl"
    # the bytes behind the cache's symlinks are the folder's: the models load bit-identically
    a = load_dit(files.paths["dit_high_noise"], "t2v-A14B").state_dict()
    b = load_dit(d / "high_noise_model", "t2v-A14B").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for role, name in (("vae", "Wan2.1_VAE.pth"), ("t5", "models_t5_umt5-xxl-enc-bf16.pth")):
        x, y = load_state_dict(files.paths[role]), load_state_dict(d / name)
        assert all(torch.equal(x[k], y[k]) for k in y)
    assert files.metadata()["ckpt_revision"] == COMMIT
    assert files.metadata()["ckpt_dit_low_noise"] == str(snap / "low_noise_model")


def test_offline_missing_file_is_one_line(tiny_dir, hf_cache):
    d = tiny_dir("t2v-A14B")
    fill_hf_cache(hf_cache, A14B, d, skip=("low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors",))
    # one expert whose files are all there resolves; the other names the missing shard
    assert "dit_high_noise" in resolve_ckpt_dir(A14B, "t2v-A14B", roles_for("t2v-A14B", expert="high")).paths
    with pytest.raises(MissingModelFileError) as e:
        resolve_ckpt_dir(A14B, "t2v-A14B", roles_for("t2v-A14B", ["dit"]))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{A14B}: low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors is not in "
                          f"the Hugging Face cache ({hf_cache}) and downloads are off (HF_HUB_OFFLINE=1)")
    assert "`wanlora-download --task t2v-A14B --only dit`" in msg


def test_cli_offline_missing_file_exit_2_no_traceback(tmp_path, tiny_dir):
    fill_hf_cache(tmp_path / "hub", A14B, tiny_dir("t2v-A14B"), skip=("Wan2.1_VAE.pth",))
    r = run(["wanlora.commands.download", "--task", "t2v-A14B", "--only", "vae"], env_for(tmp_path, offline=True))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0] == (f"wanlora-download: error: {A14B}: Wan2.1_VAE.pth is not in the Hugging Face cache "
                        f"({tmp_path / 'hub'}) and downloads are off (HF_HUB_OFFLINE=1); fetch it with "
                        "`wanlora-download --task t2v-A14B --only vae` where the network is reachable, then run again")
    # nothing was written for the missing file
    assert not list((tmp_path / "hub").rglob("*Wan2.1_VAE*"))
    # the same run from a --config_file (the shared command layer): the same one-line error
    cfg = tmp_path / "download.toml"
    cfg.write_text('task = "t2v-A14B"\nonly = ["vae"]\n')
    r2 = run(["wanlora.commands.download", "--config_file", str(cfg)], env_for(tmp_path, offline=True))
    assert r2.returncode == 2 and r2.stderr == r.stderr
    r3 = run(["wanlora.commands.download", "--task", "t2v-A14B", "--repo", "x/y", "--diffusers"], env_for(tmp_path, offline=True))
    assert r3.returncode == 2 and "--repo and --diffusers both name the repository" in r3.stderr


def test_download_one_expert_from_a_local_hub(tmp_path, tiny_dir):
    d = tiny_dir("t2v-A14B")
    with FixtureHub({A14B: d}) as hub:
        env = env_for(tmp_path, offline=False, endpoint=hub.url)
        r = run(["wanlora.commands.download", "--task", "t2v-A14B", "--expert", "high"], env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == A14B
        fetched = hub.fetched()
    # only what one expert needs: no low-noise file was requested
    assert not any(p.startswith("low_noise_model/") for p in fetched)
    assert {"high_noise_model/config.json", "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
            "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",
            "high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors", "Wan2.1_VAE.pth",
            "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model"} <= fetched
    snap = tmp_path / "hub" / "models--Wan-AI--Wan2.2-T2V-A14B" / "snapshots" / COMMIT
    assert (snap / "Wan2.1_VAE.pth").read_bytes() == (d / "Wan2.1_VAE.pth").read_bytes()
    # then offline: the cache alone serves that expert; a second run downloads nothing
    r = run(["wanlora.commands.download", "--task", "t2v-A14B", "--expert", "high"], env_for(tmp_path, offline=True))
    assert r.returncode == 0, r.stderr
    r = run(["wanlora.commands.download", "--task", "t2v-A14B", "--expert", "low"], env_for(tmp_path, offline=True))
    assert r.returncode == 2 and "low_noise_model/" in r.stderr


def test_download_into_a_folder_then_ckpt_dir_folder(tmp_path, tiny_dir):
    d = tiny_dir("t2v-1.3B")
    repo = "Wan-AI/Wan2.1-T2V-1.3B"
    with FixtureHub({repo: d}) as hub:
        env = env_for(tmp_path, offline=False, endpoint=hub.url)
        r = run(["wanlora.commands.download", "--task", "t2v-1.3B", "--dir", str(tmp_path / "models")], env)
        assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "models")
    files = resolve_ckpt_dir(tmp_path / "models", "t2v-1.3B", roles_for("t2v-1.3B"))
    for role, p in files.paths.items():
        src = d / p.relative_to(tmp_path / "models")
        assert (p.read_bytes() == src.read_bytes()) if p.is_file() else p.is_dir()
    assert not (tmp_path / "hub").exists() or not list((tmp_path / "hub").rglob("*.safetensors"))


def test_wan21_image_tasks_resolve_the_clip_file(tiny_dir):
    """i2v-14B / flf2v-14B have a ``clip`` role: the official CLIP file of the release folder (the
    other tasks none, and ``wanlora-download`` asks for it without ``--only``)."""
    assert roles_for("i2v-14B") == ("dit", "vae", "t5", "t5_tokenizer", "clip")
    assert "clip" not in roles_for("i2v-A14B") and roles_for("flf2v-14B", ["clip"]) == ("clip",)
    assert download_command("i2v-14B", roles_for("i2v-14B")) == "wanlora-download --task i2v-14B"
    assert download_command("flf2v-14B", ["clip"]) == "wanlora-download --task flf2v-14B --only clip"
    assert download_command("t2v-1.3B", roles_for("t2v-1.3B")) == "wanlora-download --task t2v-1.3B"
    for task in ("i2v-14B", "flf2v-14B"):
        d = tiny_dir(task)
        files = resolve_ckpt_dir(d, task, roles_for(task))
        assert files.paths["clip"] == d / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
        assert files.paths["dit"] == d / "diffusion_pytorch_model.safetensors.index.json"
    with pytest.raises(ValueError, match="no model file role"):
        resolve_ckpt_dir(tiny_dir("t2v-1.3B"), "t2v-1.3B", ["clip"])


def test_broken_download_resumes(tmp_path, tiny_dir):
    """A connection that drops halfway through a 24 MB file: huggingface_hub asks for the rest with
    a ``Range`` request (after its first 10 MiB chunk reached the disk) and the cached file is
    the server's byte for byte."""
    repo = "Wan-AI/Wan2.1-T2V-1.3B"
    src = tmp_path / "repo"
    shutil.copytree(tiny_dir("t2v-1.3B") / "google", src / "google")
    big = src / "models_t5_umt5-xxl-enc-bf16.pth"
    big.write_bytes(torch.randint(0, 256, (24 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                    .numpy().tobytes())
    with FixtureHub({repo: src}, cut_once=(big.name,)) as hub:
        r = run(["wanlora.commands.download", "--task", "t2v-1.3B", "--only", "t5"],
                env_for(tmp_path, offline=False, endpoint=hub.url))
        assert r.returncode == 0, r.stderr
        ranges = [rng for m, p, rng in hub.requests if m == "GET" and p.endswith(big.name)]
    assert ranges == [None, f"bytes={10 << 20}-"]
    cached = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B" / "snapshots" / COMMIT / big.name
    assert cached.read_bytes() == big.read_bytes()
    assert not list((tmp_path / "hub").rglob("*.incomplete"))

# ---- every command takes --ckpt_dir ------------------------------------------------------------


def _latent_of(out: Path) -> torch.Tensor:
    from safetensors import safe_open

    (f,) = sorted(out.glob("*.safetensors"))
    with safe_open(str(f), "pt") as sf:
        return sf.get_tensor("latent")


def test_generate_ckpt_dir_repo_and_folder_equal_file_flags(tiny_dir, hf_cache, tmp_path, capsys):
    from wanlora.commands.generate import main

    d = tiny_dir("t2v-A14B")
    snap = fill_hf_cache(hf_cache, A14B, d)
    flags = json.loads((d / "manifest.json").read_text())["flags"]
    common = ["--prompt", "a red ball", "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2",
              "--seed", "7", "--output_type", "latent"]
    explicit = [x for kv in flags.items() for x in kv]
    runs = {"flags": explicit, "folder": ["--task", "t2v-A14B", "--ckpt_dir", str(d)],
            "repo": ["--task", "t2v-A14B", "--ckpt_dir", A14B]}
    latents = {}
    for name, args in runs.items():
        out = tmp_path / name
        assert main(args + common + ["--save_path", str(out)]) == 0
        latents[name] = _latent_of(out)
        meta = json.loads(next(out.glob("*.json")).read_text())
        if name == "repo":  # the resolved files are printed and recorded with the output
            assert meta["wan.ckpt_dir"] == A14B and meta["dit_high_noise"] == str(snap / "high_noise_model")
            assert meta["wan.t5_tokenizer"] == str(snap / "google" / "umt5-xxl")
            assert f"dit_low_noise: {snap / 'low_noise_model'}" in capsys.readouterr().err
    assert torch.equal(latents["folder"], latents["flags"]) and torch.equal(latents["repo"], latents["flags"])
    # an explicit flag wins over --ckpt_dir: the VAE-less folder still works with --vae given
    bare = copy_without(d, tmp_path / "bare", "Wan2.1_VAE.pth")
    out = tmp_path / "explicit-vae"
    assert main(["--task", "t2v-A14B", "--ckpt_dir", str(bare), "--vae", flags["--vae"], *common,
                 "--save_path", str(out)]) == 0
    assert torch.equal(_latent_of(out), latents["flags"])


def test_commands_offline_missing_file_one_line_exit_2(tmp_path, tiny_dir):
    fill_hf_cache(tmp_path / "hub", A14B, tiny_dir("t2v-A14B"),
                  skip=("low_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",))
    r = run(["wanlora.commands.generate", "--task", "t2v-A14B", "--ckpt_dir", A14B, "--prompt", "x",
             "--save_path", str(tmp_path / "o")], env_for(tmp_path, offline=True))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("wanlora-generate: error:")]
    assert line.startswith(f"wanlora-generate: error: {A14B}: low_noise_model/diffusion_pytorch_model-00001-of-"
                           "00002.safetensors is not in the Hugging Face cache")
    assert line.endswith("fetch it with `wanlora-download --task t2v-A14B` where the network is reachable, "
                         "then run again")
    assert not (tmp_path / "o").exists()  # stopped before any model loaded or file was written


def test_cache_text_train_merge_take_ckpt_dir(tiny_dir, hf_cache, tmp_path):
    from wanlora.commands import cache_latents, cache_text, merge_lora, train

    d = tiny_dir("t2v-A14B")
    snap = fill_hf_cache(hf_cache, A14B, d)
    # cache-text: only umT5 and its tokenizer (any task's repository gives the same encoder)
    ns = cache_text.command_line().parse_namespace(["--dataset_config", "x.toml", "--ckpt_dir", A14B])
    assert (ns.t5, ns.t5_tokenizer) == (str(snap / "models_t5_umt5-xxl-enc-bf16.pth"), str(snap / "google/umt5-xxl"))
    ns = cache_latents.command_line().parse_namespace(["--dataset_config", "x.toml", "--task", "t2v-A14B",
                                                       "--ckpt_dir", A14B])
    assert ns.vae == str(snap / "Wan2.1_VAE.pth") and not hasattr(ns, "t5")
    # training: both experts; one with --expert; VAE and umT5 only when samples are rendered
    ns = train.parse_args(["--task", "t2v-A14B", "--ckpt_dir", A14B, "--dataset_config", "x.toml",
                           "--output_dir", str(tmp_path)])
    assert (ns.dit, ns.dit_high_noise, ns.vae) == (str(snap / "low_noise_model"), str(snap / "high_noise_model"), None)
    ns = train.parse_args(["--task", "t2v-A14B", "--ckpt_dir", A14B, "--expert", "high", "--dataset_config",
                           "x.toml", "--output_dir", str(tmp_path), "--sample_prompts", "p.txt"])
    assert (ns.dit, ns.dit_high_noise, ns.vae) == (str(snap / "high_noise_model"), None, str(snap / "Wan2.1_VAE.pth"))
    # merge takes one DiT: the expert must be named
    cl = merge_lora.command_line()
    base = ["--task", "t2v-A14B", "--ckpt_dir", A14B, "--lora_weight", "l.safetensors", "--save_merged_model", "m.st"]
    assert cl.parse_namespace(base + ["--expert", "high_noise"]).dit == str(snap / "high_noise_model")
    with pytest.raises(ValueError, match="takes one DiT; say which expert with --expert"):
        cl.parse_namespace(base)
