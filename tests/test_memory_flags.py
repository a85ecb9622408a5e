"""The memory flags as users type them: musubi-tuner's command line parses as written; training with
fp8 + block swap + checkpoints on the host + the inactive expert parked gives the same LoRAs, bit
for bit, as fp8 alone; --estimate_memory prints the prediction and loads nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from wanlora.commands.train import parse_config
from wanlora.training.trainer import train

from test_train import _args, _Batches

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after


def test_musubi_memory_flags_accepted_as_written(tmp_path):
    config = parse_config(["--task", "t2v-A14B", "--dit", "low_noise_model", "--dataset_config", "d.toml",
                           "--output_dir", str(tmp_path), "--fp8_base", "--fp8_scaled", "--blocks_to_swap", "20",
                           "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"])
    m = config.model
    assert (m.fp8, m.blocks_to_swap, m.gradient_checkpointing, m.gradient_checkpointing_cpu_offload) == \
        ("scaled", 20, True, True)
    assert parse_config(["--task", "t2v-A14B", "--dit", "x", "--dataset_config", "d", "--output_dir", "o",
                         "--fp8_base"]).model.fp8 == "base"


def test_fp8_swap_offload_train_the_same_loras(tiny_dir, tmp_path):
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    common = ("--dit_high_noise", flags["--dit_high_noise"], "--fp8_base", "--fp8_scaled", "--gradient_checkpointing",
              "--timestep_boundary", "0.5", "--max_train_steps", "8", "--network_dropout", "0.1")
    train(_args(flags, "unused.toml", tmp_path / "a", *common), dataset=_Batches())
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    st = train(_args(flags, "unused.toml", tmp_path / "b", *common, "--blocks_to_swap", "1",
                     "--gradient_checkpointing_cpu_offload", "--offload_inactive_dit"), dataset=_Batches())
    assert {x[1] for x in st.losses} == {"high_noise", "low_noise"}
    for name in ("lora_high_noise.safetensors", "lora_low_noise.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bf16_checkpoint_stash_flag(tiny_dir, tmp_path):
    """--gradient_checkpointing_cpu_offload_dtype bf16: parsed as a dtype, reaches the DiT, trains a
    LoRA close to the float32 stash's but not equal to it (the recomputation starts from a rounded
    input); refused with fp16 or without the offload; the estimate counts 2-byte checkpoints."""
    from wanlora.training.memory import MemorySettings, estimate_memory

    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    common = ("--expert", "low", "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload",
              "--max_train_steps", "3")
    config = parse_config(["--task", "t2v-A14B", "--dit", "x", "--dataset_config", "d", "--output_dir", "o",
                           *common, "--gradient_checkpointing_cpu_offload_dtype", "bf16"])
    assert config.model.gradient_checkpointing_cpu_offload_dtype == torch.bfloat16
    train(_args(flags, "unused.toml", tmp_path / "a", *common), dataset=_Batches())
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(_args(flags, "unused.toml", tmp_path / "b", *common, "--gradient_checkpointing_cpu_offload_dtype", "bf16"),
          dataset=_Batches())
    a, b = load_file(tmp_path / "a" / "lora.safetensors"), load_file(tmp_path / "b" / "lora.safetensors")
    va = torch.cat([a[k].float().reshape(-1) for k in sorted(a)])
    vb = torch.cat([b[k].float().reshape(-1) for k in sorted(a)])
    assert not torch.equal(va, vb) and (va - vb).norm() / va.norm() < 1e-2
    for extra, match in ((("--gradient_checkpointing_cpu_offload_dtype", "fp16"), "bf16 or fp32"),):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(ValueError, match=match):
            train(_args(flags, "unused.toml", tmp_path / "c", *common, *extra), dataset=_Batches())
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="needs --gradient_checkpointing_cpu_offload"):
        train(_args(flags, "unused.toml", tmp_path / "d", "--expert", "low", "--gradient_checkpointing",
                    "--gradient_checkpointing_cpu_offload_dtype", "bf16", "--max_train_steps", "1"), dataset=_Batches())
    s = dict(task="t2v-A14B", width=832, height=480, frames=81, checkpoint_offload=True)
    fp32 = estimate_memory(MemorySettings(**s)).host["block checkpoints (float32)"]
    assert estimate_memory(MemorySettings(**s, checkpoint_dtype=torch.bfloat16)).host[
        "block checkpoints (bfloat16)"] * 2 == fp32 == 40 * 32760 * 5120 * 4


def test_swap_needs_checkpointing(tiny_dir, tmp_path):
    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    with pytest.raises(ValueError, match="--gradient_checkpointing"):
        train(_args(flags, "unused.toml", tmp_path, "--expert", "low", "--blocks_to_swap", "1",
                    "--max_train_steps", "1"), dataset=_Batches())


def test_estimate_memory_commands(tmp_path, capsys):
    from wanlora.commands import generate
    from wanlora.commands import train as train_cmd

    clips = tmp_path / "clips"
    clips.mkdir()
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [832, 480]\ncaption_extension = ".txt"\n\n[[datasets]]\n'
                    f'video_directory = "{clips.as_posix()}"\ncache_directory = "{(tmp_path / "cache").as_posix()}"\n'
                    f'target_frames = [1, 33]\n')
    missing = str(tmp_path / "not_loaded")  # nothing is read: the estimate needs no model file
    assert train_cmd.main(["--task", "t2v-A14B", "--dit", missing + "/low_noise_model", "--dataset_config",
                           str(toml), "--network_dim", "32", "--fp8_base", "--blocks_to_swap", "20",
                           "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload",
                           "--estimate_memory"]) == 0
    out = capsys.readouterr().out
    assert "t2v-A14B, 832x480x33 (14040 tokens)" in out and "GPU peak" in out and "host peak" in out
    assert "block checkpoints (float32)" in out and "fits a" in out
    assert generate.main(["--task", "t2v-A14B", "--dit", missing, "--dit_high_noise", missing, "--t5", missing,
                          "--video_size", "480", "832", "--video_length", "81", "--fp8_base",
                          "--blocks_to_swap", "20", "--estimate_memory", "--prompt", "a cat", "--output_type", "latent"]) == 0
    out = capsys.readouterr().out
    assert "832x480x81 (32760 tokens), batch 2, generation" in out and "inactive expert (pinned)" in out


def test_generate_fp8_and_block_swap_give_the_same_latents(tiny_dir, tmp_path):
    """Both A14B experts with --fp8_base: with --blocks_to_swap 1 (the experts share the device
    slots, the pipeline moves the rest between host and device) the latent is the same, bit for bit."""
    from safetensors import safe_open

    from wanlora.commands.generate import main as generate_main
    from test_generate import _flags, _only

    flags = _flags(tiny_dir, "t2v-A14B")
    latents = []
    for extra in ([], ["--blocks_to_swap", "1"]):
        out = tmp_path / f"o{len(latents)}"
        assert generate_main(flags + ["--prompt", "a cat", "--video_size", "32", "32", "--video_length", "5",
                                      "--infer_steps", "3", "--seed", "3", "--fp8_base", "--output_type", "latent",
                                      "--save_path", str(out), *extra]) == 0
        with safe_open(str(_only(out, "*.safetensors")), "pt") as f:
            latents.append(f.get_tensor("latent"))
    assert torch.equal(latents[0], latents[1]) and torch.isfinite(latents[0]).all()
