"""The command layer (wanlora.commands.args): every command's --config_file, switches with a
negative form, the command line over the file, one dtype parser, --help with every default."""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch

from wanlora.commands.args import ConfigFileError
from wanlora.commands.train import parse_args, parse_config
from wanlora.run_config import DtypeError, default_device, parse_dtype

COMMANDS = ["cache_latents", "cache_text", "train", "generate", "convert_lora", "merge_lora", "ema_lora"]
BASE = ["--task", "t2v-A14B", "--dit", "d", "--dataset_config", "ds.toml", "--output_dir", "out"]


def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"wanlora.commands.{name}").build_parser()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_a_config_file_and_shows_every_default(name):
    p = _parser(name)
    flags = {o for a in p._actions for o in a.option_strings}
    assert {"--config_file", "--verbose", "--no-verbose"} <= flags
    text = " ".join(p.format_help().split())  # help lines wrap anywhere
    for a in p._actions:
        if a.option_strings and a.dest not in ("help", "config_file") and not a.dest.startswith("_musubi_"):
            assert "(default" in (p._get_formatter()._get_help_string(a) or ""), a.dest
    assert "(default: sdpa)" in text or name not in ("train", "generate")


def test_a_switch_from_the_file_is_turned_off_on_the_command_line(tmp_path):
    """Regression: `sample_at_first = true` in the file could not be undone on the command line."""
    cfg = tmp_path / "t.toml"
    cfg.write_text("sample_at_first = true\ngradient_checkpointing = true\n")
    on = parse_config(BASE + ["--config_file", str(cfg)])
    assert on.sampling.sample_at_first is True and on.model.gradient_checkpointing is True
    off = parse_config(BASE + ["--config_file", str(cfg), "--no-sample_at_first"])
    assert off.sampling.sample_at_first is False and off.model.gradient_checkpointing is True
    cfg.write_text("sample_at_first = false\n")  # true/false both read from TOML
    assert parse_config(BASE + ["--config_file", str(cfg)]).sampling.sample_at_first is False
    assert parse_config(BASE + ["--config_file", str(cfg), "--sample_at_first"]).sampling.sample_at_first is True


def test_no_x_switch_has_a_positive_form(tmp_path):
    from wanlora.commands.cache_text import command_line

    cfg = tmp_path / "c.toml"
    cfg.write_text('no_progress = true\ndataset_config = "ds.toml"\nt5 = "t5.pth"\n')
    cl = command_line()
    assert cl.parse(["--config_file", str(cfg)]).no_progress is True
    assert cl.parse(["--config_file", str(cfg), "--progress"]).no_progress is False


def test_command_line_steps_beat_file_epochs(tmp_path):
    """Regression: a command-line --max_train_steps lost to max_train_epochs from the config file."""
    cfg = tmp_path / "t.toml"
    cfg.write_text("[optimization]\nmax_train_epochs = 10\nmax_train_steps = 50\n")
    assert parse_config(BASE + ["--config_file", str(cfg)]).optimization.max_train_epochs == 10  # file: epochs win
    o = parse_config(BASE + ["--config_file", str(cfg), "--max_train_steps", "7"]).optimization
    assert (o.max_train_steps, o.max_train_epochs) == (7, None)
    o = parse_config(BASE + ["--config_file", str(cfg), "--max_train_steps", "7", "--max_train_epochs", "2"]).optimization
    assert (o.max_train_steps, o.max_train_epochs) == (7, 2)  # both on the command line: as documented


def test_high_noise_learning_rate_zero_is_kept():
    """Regression: --learning_rate_high_noise 0 silently became --learning_rate (an `or`)."""
    c = parse_config(BASE + ["--learning_rate", "1e-4", "--learning_rate_high_noise", "0",
                             "--network_dim_high_noise", "8", "--network_alpha_high_noise", "0"])
    high, low = c.lora("high_noise"), c.lora("low_noise")
    assert (high.learning_rate, high.dim, high.alpha) == (0.0, 8, 0.0)
    assert (low.learning_rate, low.dim, low.alpha) == (1e-4, 4, 1.0)
    d = parse_config(BASE).lora("high_noise")
    assert (d.learning_rate, d.dim, d.alpha, d.weights) == (1e-4, 4, 1.0, None)


def test_network_weights_reach_a_lone_high_noise_lora():
    c = parse_config(BASE + ["--network_weights", "w.safetensors"])
    assert c.lora("high_noise", alone=True).weights == "w.safetensors"  # one expert trained: it starts there
    assert c.lora("high_noise").weights is None  # both experts: it is the low-noise LoRA's
    assert c.lora("low_noise").weights == "w.safetensors"


def test_every_command_rejects_unknown_keys_with_a_suggestion(tmp_path):
    from wanlora.commands.generate import parse_args as generate_args

    cfg = tmp_path / "g.toml"
    cfg.write_text('[sampling]\nprompt = "a cat"\ninfer_step = 4\n')
    with pytest.raises(ConfigFileError, match=r"unknown key 'infer_step'.*wanlora-generate.*infer_steps"):
        generate_args(["--task", "t2v-1.3B", "--dit", "d", "--t5", "t", "--vae", "v", "--config_file", str(cfg)])
    cfg.write_text('prompt = "a cat"\ninfer_steps = 4\nvideo_size = [480, 832]\n')
    g = generate_args(["--task", "t2v-1.3B", "--dit", "d", "--t5", "t", "--vae", "v", "--config_file", str(cfg),
                       "--infer_steps", "9"])
    assert (g.request.prompt, g.request.infer_steps, g.request.video_size) == ("a cat", 9, (480, 832))


def test_required_flags_may_come_from_the_file(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[model_files]\ntask = "ti2v-5B"\ndit = "d"\n[data]\ndataset_config = "ds.toml"\n')
    with pytest.raises(SystemExit):
        parse_args(["--config_file", str(cfg)])
    assert "missing --output_dir (on the command line or in --config_file)" in capsys.readouterr().err
    c = parse_config(["--config_file", str(cfg), "--output_dir", "o"])
    assert (c.model_files.task, str(c.saving.output_dir)) == ("ti2v-5B", "o")


def test_one_dtype_parser_on_the_command_line_and_in_files(tmp_path):
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(DtypeError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")
    assert parse_config(BASE + ["--save_precision", "bf16"]).saving.save_precision is torch.bfloat16
    cfg = tmp_path / "t.toml"
    cfg.write_text('save_precision = "fp16"\ndit_dtype = "bfloat16"\n')
    c = parse_config(BASE + ["--config_file", str(cfg)])
    assert (c.saving.save_precision, c.model.dit_dtype) == (torch.float16, torch.bfloat16)
    cfg.write_text('save_precision = "fp8"\n')
    with pytest.raises(ConfigFileError, match="save_precision.*fp8"):
        parse_config(BASE + ["--config_file", str(cfg)])
    assert default_device("cpu") == torch.device("cpu")


def test_configs_are_frozen():
    import dataclasses

    c = parse_config(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optimization.seed = 3
