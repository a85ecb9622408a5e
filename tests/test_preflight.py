"""Pre-flight checks: everything that can fail later is refused (or warned about) before any
model loads, each as one line naming the flag and the fix."""

from __future__ import annotations

import errno
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from wanlora.commands import preflight as P
from wanlora.commands.preflight import PreflightError
from wanlora.commands.train import parse_args
from wanlora.io_utils import save_safetensors
from wanlora.tasks import get_task


def _flags(tiny_dir, task="t2v-A14B") -> dict:
    return json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---- folders and disk space -------------------------------------------------------------------


def test_output_folder_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(PreflightError) as e:
        P.check_output_dir(f, "--output_dir")
    assert _one_line(e) == f"--output_dir {f}: is a file, not a folder; give a folder (it is created when missing)"
    with pytest.raises(PreflightError, match=r"out is a file, not a folder; choose another path"):
        P.check_output_dir(f / "sub", "--output_dir")
    with pytest.raises(PreflightError, match="is a folder; give a file name"):
        P.check_output_file(tmp_path, "--save_merged_model")
    assert P.check_output_dir(tmp_path / "new" / "deep", "--output_dir").is_dir()  # created


@pytest.mark.parametrize("err, fix", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied: make the folder writable"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device: free space there"),
])
def test_unwritable_output_folder_is_refused_with_the_fix(tmp_path, monkeypatch, err, fix):
    def refuse(*a, **k):
        raise err

    monkeypatch.setattr(P.tempfile, "mkstemp", refuse)
    with pytest.raises(PreflightError) as e:
        P.check_output_dir(tmp_path, "--output_dir")
    assert _one_line(e).startswith(f"--output_dir {tmp_path}: cannot write there: {fix}")


def test_read_only_file_system_for_real(mounted_tmpfs):
    ro = mounted_tmpfs(64, read_only=True)
    with pytest.raises(PreflightError, match="cannot write there: the file system is read-only"):
        P.check_output_dir(ro / "out", "--output_dir")


def test_free_space_warning(tmp_path):
    assert P.free_space_warning(tmp_path, 1, "the LoRAs") is None
    w = P.free_space_warning(tmp_path / "not" / "yet", 2**60, "3 save(s) of the LoRAs")
    assert "GiB free, but 3 save(s) of the LoRAs need about" in w and "free space or choose another folder" in w


# ---- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, msg", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (["--max_train_steps", "-5"], "--max_train_steps -5: must be at least 1"),
    (["--network_alpha", "-1"], "--network_alpha -1.0: must be above 0"),
    (["--network_dim", "0", "--learning_rate", "0"], "--network_dim 0: must be at least 1; --learning_rate 0.0: must be above 0"),
    (["--network_dropout", "1.5"], "--network_dropout 1.5: must be in [0, 1)"),
    (["--save_every_n_steps", "0"], "--save_every_n_steps 0: must be at least 1"),
])
def test_numeric_flags_out_of_range(flags, msg):
    args = parse_args(["--task", "t2v-1.3B", "--dit", "d", "--dataset_config", "c", "--output_dir", "o", *flags])
    with pytest.raises(PreflightError) as e:
        P.check_train_numbers(args)
    assert _one_line(e) == msg


def test_rank_above_the_layer_width(tiny_dir):
    flags = _flags(tiny_dir)
    assert P.dit_widths(flags["--dit"]) == (64, 128, 2)  # the tiny model's dim, ffn_dim, layers
    P.check_rank_fits(64, 64)
    with pytest.raises(PreflightError) as e:
        P.check_rank_fits(128, 64)
    assert _one_line(e).startswith("--network_dim 128: above the width of the DiT's layers (64)")


# ---- files against the task ---------------------------------------------------------------------


def test_vae_kind_from_the_header_against_the_task(tiny_dir):
    vae21 = _flags(tiny_dir)["--vae"]
    vae22 = _flags(tiny_dir, "ti2v-5B")["--vae"]
    assert P.vae_kind_of(vae21) == "wan2.1" and P.vae_kind_of(vae22) == "wan2.2"
    with pytest.raises(PreflightError) as e:
        P.check_vae_for_task(vae21, get_task("ti2v-5B"), purpose="for the samples during training")
    assert _one_line(e) == (f"--vae {vae21} is the wan2.1 VAE but task ti2v-5B uses the wan2.2 VAE; pass the "
                            "Wan2.2_VAE.pth file (for the samples during training)")
    dit_shard = next(Path(_flags(tiny_dir)["--dit"]).glob("*.safetensors"))
    with pytest.raises(ValueError, match="--vae expects the Wan2.1 or Wan2.2 VAE, but this file is a Wan DiT"):
        P.check_vae_for_task(dit_shard, get_task("t2v-A14B"))


def test_swapped_experts_are_warned():
    assert P.swapped_experts_warning("m/low_noise_model", "m/high_noise_model") is None
    w = P.swapped_experts_warning("m/high_noise_model", "m/low_noise_model")
    assert w.startswith("--dit m/high_noise_model names high_noise and --dit_high_noise m/low_noise_model names "
                        "low_noise: the experts look swapped")


def _lora(path, md):
    sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 64),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(64, 4),
          "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}
    save_safetensors(sd, path, md)
    return str(path)


def test_generation_refuses_a_lora_of_another_task_before_loading(tiny_dir, tmp_path):
    flags = _flags(tiny_dir)
    other = _lora(tmp_path / "ti2v.safetensors", {"wan.task": "ti2v-5B"})
    args = Namespace(task="t2v-A14B", dit=flags["--dit"], dit_high_noise=flags["--dit_high_noise"],
                     vae=flags["--vae"], save_path=str(tmp_path / "gen"), lora_weight=[other],
                     lora_weight_high_noise=None)
    with pytest.raises(PreflightError) as e:
        P.preflight_generate(args)
    assert _one_line(e) == f"refusing to apply: {other}: made for task ti2v-5B (wan.task), not t2v-A14B"
    # an expert LoRA on a single-model task
    expert = _lora(tmp_path / "hi.safetensors", {"wan.task": "t2v-A14B", "wan.expert": "high_noise"})
    with pytest.raises(PreflightError, match="made for task t2v-A14B .*; .*made for the high_noise expert of an A14B model"):
        P.preflight_generate(Namespace(task="t2v-1.3B", dit="d", dit_high_noise=None, vae=None,
                                       save_path=str(tmp_path / "gen"), lora_weight=[expert],
                                       lora_weight_high_noise=None))
    # the right LoRA, under either flag (metadata decides the expert): fine
    args.lora_weight = [expert]
    assert P.preflight_generate(args) == []
    args.vae = _flags(tiny_dir, "ti2v-5B")["--vae"]
    with pytest.raises(PreflightError, match="is the wan2.2 VAE but task t2v-A14B uses the wan2.1 VAE"):
        P.preflight_generate(args)


def test_training_preflight(tiny_dir, tmp_path, caplog):
    flags = _flags(tiny_dir)
    base = ["--task", "t2v-A14B", "--dit", flags["--dit_high_noise"], "--dit_high_noise", flags["--dit"],
            "--dataset_config", "c.toml", "--output_dir", str(tmp_path / "out")]
    with caplog.at_level("WARNING", logger="wanlora.preflight"):
        warnings = P.preflight_train(parse_args(base + ["--sample_prompts", "p.txt"]))
    assert [w.split(":")[0] for w in warnings] == [f"--dit {flags['--dit_high_noise']} names high_noise and "
                                                   f"--dit_high_noise {flags['--dit']} names low_noise",
                                                   "--sample_prompts is given but no --sample_every_n_steps, "
                                                   "--sample_every_n_epochs or --sample_at_first"]
    assert "experts look swapped" in caplog.text
    with pytest.raises(PreflightError, match="--network_dim 512: above the width"):
        P.preflight_train(parse_args(base + ["--network_dim", "512"]))
    with pytest.raises(PreflightError, match="is the wan2.1 VAE but task ti2v-5B"):
        f5 = _flags(tiny_dir, "ti2v-5B")
        P.preflight_train(parse_args(["--task", "ti2v-5B", "--dit", f5["--dit"], "--dataset_config", "c",
                                      "--output_dir", str(tmp_path / "o5"), "--sample_prompts", "p.txt",
                                      "--sample_every_n_steps", "5", "--vae", flags["--vae"]]))


def test_merge_preflight_output(tiny_dir, tmp_path):
    flags = _flags(tiny_dir)
    with pytest.raises(PreflightError, match="--save_merged_model .*: is a folder; give a file name"):
        P.preflight_merge(flags["--dit"], tmp_path)
    assert P.preflight_merge(flags["--dit"], tmp_path / "m.safetensors", torch.bfloat16) == []


def test_caching_an_empty_dataset_is_refused(tmp_path):
    from wanlora.dataset.config import load_dataset_config

    (tmp_path / "media").mkdir()
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\n[[datasets]]\nimage_directory = "{tmp_path / "media"}"\n'
                    f'cache_directory = "{tmp_path / "cache"}"\n')
    config = load_dataset_config(toml, "t2v-1.3B")
    with pytest.raises(PreflightError) as e:
        P.preflight_cache_latents(config, get_task("t2v-1.3B"), None)
    assert _one_line(e) == (f"{toml}: the dataset has no media files (image_directory {tmp_path / 'media'}): "
                            "nothing to cache; check the folders, the JSONL and the file extensions")


def test_flags_of_a_nested_run_config_are_read_flat():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Net:
        network_dim: int = 0

    @dataclass(frozen=True)
    class Run:
        task: str = "t2v-1.3B"
        network: Net = field(default_factory=Net)

    flat = P.flat_flags(Run())
    assert flat.task == "t2v-1.3B" and flat.network_dim == 0
    with pytest.raises(PreflightError, match="--network_dim 0: must be at least 1"):
        P.check_train_numbers(flat)
