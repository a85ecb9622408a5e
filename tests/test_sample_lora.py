"""--sample_lora / --sample_lora_high_noise: extra LoRAs (a Lightning / distill LoRA) stacked on the
trained one in the samples during training only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_runs import train_argv
from wanlora.commands.preflight import PreflightError, sample_lora_checks
from wanlora.commands.train import parse_config
from wanlora.lora.apply import parse_lora_spec
from wanlora.tasks import get_task
from wanlora.training.trainer import train
from wanlora.video_io import probe_video, read_video_frames

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after


def test_lora_spec_path_and_multiplier():
    assert parse_lora_spec("a.safetensors", "--sample_lora") == ("a.safetensors", 1.0)
    assert parse_lora_spec("dir/a.safetensors:0.5", "--sample_lora") == ("dir/a.safetensors", 0.5)
    assert parse_lora_spec(r"C:\loras\a.safetensors", "--sample_lora") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\a.safetensors:-1", "--sample_lora") == (r"C:\loras\a.safetensors", -1.0)
    for bad in (":1.0", "a.safetensors:nan"):
        with pytest.raises(ValueError, match="expected PATH or PATH:MULTIPLIER"):
            parse_lora_spec(bad, "--sample_lora")


BASE = ["--task", "t2v-A14B", "--dit", "d", "--dataset_config", "ds.toml", "--output_dir", "out"]


def test_the_flag_repeats_and_the_command_line_replaces_the_file(tmp_path):
    c = parse_config(BASE + ["--sample_lora", "a.safetensors", "--sample_lora", "b.safetensors:0.5", "c.safetensors"])
    assert c.sampling.sample_lora == ("a.safetensors", "b.safetensors:0.5", "c.safetensors")
    assert parse_config(BASE).sampling.sample_lora == ()
    cfg = tmp_path / "train.toml"
    cfg.write_text('sample_lora = ["file.safetensors"]\nsample_lora_high_noise = "high.safetensors:2"\n')
    c = parse_config(BASE + ["--config_file", str(cfg)])
    assert c.sampling.sample_lora == ("file.safetensors",) and c.sampling.sample_lora_high_noise == ("high.safetensors:2",)
    c = parse_config(BASE + ["--config_file", str(cfg), "--sample_lora", "x.safetensors", "--sample_lora", "y.safetensors"])
    assert c.sampling.sample_lora == ("x.safetensors", "y.safetensors")


def _flags(tiny_dir, task="t2v-A14B"):
    return json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]


class _Batches:
    """Fixed synthetic batches (``ds[epoch * n + i]`` = batch i): no caches needed."""

    def __init__(self, n=2, c=16):
        g = torch.Generator().manual_seed(0)
        self.b = [{"latents": torch.randn(1, c, 2, 4, 4, generator=g), "context": [torch.randn(3, 32, generator=g)],
                   "keys": [str(i)]} for i in range(n)]

    def __len__(self):
        return len(self.b)

    def __getitem__(self, pos):
        return self.b[pos % len(self.b)]


def _extra_lora(flags, path: Path, task="t2v-A14B", metadata=None) -> Path:
    """A LoRA of every attention projection of the tiny DiT with random weights (a stand-in for a
    Lightning LoRA)."""
    from wanlora.models import load_dit

    dit = load_dit(flags["--dit"], task=task)
    g = torch.Generator().manual_seed(11)
    sd = {}
    for name, m in dit.named_modules():
        if isinstance(m, torch.nn.Linear) and ".self_attn." in name:
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path), metadata=metadata or {})
    return path


def _run(flags, out: Path, prompts: Path, *extra):
    argv = train_argv(flags, out, "--max_train_steps", "2", "--sample_prompts", str(prompts), "--sample_at_first",
                      "--sample_every_n_steps", "2", "--vae", flags["--vae"], "--t5", flags["--t5"],
                      "--t5_tokenizer", flags["--t5_tokenizer"], *extra)
    train(parse_config(argv), dataset=_Batches())
    frames = {}
    for p in sorted((out / "sample").glob("*.mp4")):
        frames[p.name] = read_video_frames(p, range(probe_video(p).frame_count)).astype(np.int16)
    return load_file(str(out / ("lora.safetensors" if (out / "lora.safetensors").exists()
                                else "lora_low_noise.safetensors"))), frames


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_lora_changes_the_samples_and_leaves_the_trained_lora_alone(tiny_dir, tmp_path, caplog):
    flags = _flags(tiny_dir)
    extra = _extra_lora(flags, tmp_path / "lightning.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball --w 32 --h 32 --f 5 --s 2 --d 3\n")
    lora, plain = _run(flags, tmp_path / "plain", prompts, "--expert", "low")
    with caplog.at_level("INFO", logger="wanlora.training.validation"):
        lora_x, stacked = _run(flags, tmp_path / "stacked", prompts, "--expert", "low",
                               "--sample_lora", f"{extra}:1.5")
    assert f"samples: LoRA {extra} x1.5 stacked on the low_noise expert" in caplog.text
    lora_0, zero = _run(flags, tmp_path / "zero", prompts, "--expert", "low", "--sample_lora", f"{extra}:0")
    assert plain.keys() == stacked.keys() == zero.keys() and len(plain) == 2  # steps 0 and 2
    for name in plain:
        assert np.abs(plain[name] - stacked[name]).mean() > 1.0, name  # the extra LoRA shows in the video
        assert np.array_equal(plain[name], zero[name]), name  # at multiplier 0 the hooks add nothing
    # the trained LoRA is bit-identical: the extra adapters are never trained nor merged
    assert _same(lora, lora_x) and _same(lora, lora_0)


def test_sample_lora_high_noise_goes_to_its_expert(tiny_dir, tmp_path, caplog):
    flags = _flags(tiny_dir)
    extra = _extra_lora(flags, tmp_path / "high.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball --w 32 --h 32 --f 1 --s 2 --d 3\n")
    both = ("--dit_high_noise", flags["--dit_high_noise"], "--timestep_boundary", "0.5")
    lora, plain = _run(flags, tmp_path / "plain", prompts, *both)
    with caplog.at_level("INFO", logger="wanlora.training.validation"):
        lora_x, stacked = _run(flags, tmp_path / "stacked", prompts, *both, "--sample_lora_high_noise", str(extra))
    assert "stacked on the high_noise expert" in caplog.text
    assert all(np.abs(plain[n] - stacked[n]).mean() > 1.0 for n in plain)
    assert _same(lora, lora_x)
    # a run of the low-noise expert alone has no high-noise expert to stack it on: said, and skipped
    caplog.clear()
    with caplog.at_level("WARNING", logger="wanlora.training.validation"):
        _, alone = _run(flags, tmp_path / "alone", prompts, "--expert", "low", "--sample_lora_high_noise", str(extra))
    assert "which this run does not load; the samples go without it" in caplog.text


def test_preflight_names_the_flag_and_the_file(tiny_dir, tmp_path):
    flags = _flags(tiny_dir)
    args = parse_config(BASE + ["--sample_lora", str(tmp_path / "missing.safetensors:0.5")])
    with pytest.raises(FileNotFoundError, match=r"--sample_lora .*missing\.safetensors: no such file"):
        sample_lora_checks(args.sampling, get_task("t2v-A14B"))
    other = _extra_lora(flags, tmp_path / "other.safetensors", metadata={"wan.task": "i2v-A14B"})
    args = parse_config(BASE + ["--sample_lora", str(other)])
    with pytest.raises(PreflightError, match="made for task i2v-A14B"):
        sample_lora_checks(args.sampling, get_task("t2v-A14B"))
    ok = _extra_lora(flags, tmp_path / "ok.safetensors")
    warnings = sample_lora_checks(parse_config(BASE + ["--sample_lora", str(ok)]).sampling, get_task("t2v-A14B"))
    assert warnings == ["--sample_lora is given without --sample_prompts: no sample is made, so it is not used"]
