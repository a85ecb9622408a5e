"""The ``wanlora-train`` command line: every flag, and the ``--config_file`` TOML merge.

Flag names are the ones users know from the Wan LoRA tooling (musubi-tuner / kohya:
``--network_dim``, ``--timestep_sampling``, ``--save_every_n_steps``, ...) plus the Wan2.2 expert
flags (``--expert``, ``--dit_high_noise``, ``--expert_lora``, ``--expert_switch_every``, ...).

Any flag can also come from a TOML file given with ``--config_file``: a key is the flag's name
without the dashes (``network_dim = 16``, ``network_args = ["rank_dropout=0.1"]``, booleans for
switches); keys may sit at the top level or inside ``[tables]``, which only group them for the
reader. The command line wins over the file; the file wins over the built-in defaults. A key
that names no flag is an error naming the key and the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wanlora.tasks import task_names

__all__ = ["build_parser", "parse_args", "load_config_file", "ConfigFileError"]


class ConfigFileError(ValueError):
    """A ``--config_file`` that cannot be used (unknown key, wrong type, unreadable TOML)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-train`` (defaults are the built-in ones)."""
    p = argparse.ArgumentParser(
        prog="wanlora-train",
        description="Train a LoRA on a Wan2.2 / Wan2.1 DiT from cached latents and text "
        "(run under `accelerate launch -m wanlora.train ...`).",
    )
    p.add_argument("--config_file", type=Path, help="TOML file with any of these flags (the command line wins)")

    g = p.add_argument_group("model")
    g.add_argument("--task", choices=task_names(), help="which Wan model (required)")
    g.add_argument("--dit", help="DiT checkpoint: a file, a shard index .json or a folder. With "
                   "--dit_high_noise this is the low-noise expert (required)")
    g.add_argument("--dit_high_noise", help="A14B: the high-noise expert; trains both experts in one run")
    g.add_argument("--expert", choices=["high", "low", "high_noise", "low_noise"],
                   help="A14B, one expert: which one --dit is (default: detected from a "
                   "'high_noise'/'low_noise' in its path)")
    g.add_argument("--expert_lora", choices=["separate", "shared"], default="separate",
                   help="both experts: one LoRA per expert (NAME_high_noise / NAME_low_noise, the "
                   "default) or one LoRA shared by both (one file)")
    g.add_argument("--expert_switch_every", type=int, default=1,
                   help="both experts: draw the expert once per this many optimizer steps (fewer weight swaps)")
    g.add_argument("--offload_inactive_dit", action="store_true",
                   help="both experts: keep the inactive expert's weights in pinned CPU memory")
    g.add_argument("--dit_dtype", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the frozen DiT weights (default: bf16/fp16 under that mixed precision, else fp32)")
    g.add_argument("--attn_mode", default="sdpa", help="attention kernel: sdpa (PyTorch picks), cudnn, flash "
                   "(FlashAttention-2), flash3 (FlashAttention-3), xformers; torch = sdpa. sage has no "
                   "backward and is refused for training")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute DiT blocks in backward")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_config", type=Path, help="dataset TOML (required; caches must exist)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=2, help="DataLoader workers")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers between epochs")
    g.add_argument("--ti2v_first_frame", type=float, nargs="?", const=1.0, default=0.0,
                   help="ti2v-5B: train image-to-video — with this probability per sample (1.0 when "
                   "given alone) latent frame 0 stays clean at timestep 0 and is left out of the loss")

    g = p.add_argument_group("network")
    g.add_argument("--network_module", default="networks.lora_wan", help="LoRA network module")
    g.add_argument("--network_dim", type=int, default=4, help="LoRA rank")
    g.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha (scale = alpha / rank)")
    g.add_argument("--network_dropout", type=float, help="dropout on the LoRA down output")
    g.add_argument("--network_args", nargs="*", default=[], help="key=value for the network module")
    g.add_argument("--network_weights", help="start from these LoRA weights (low-noise/only LoRA)")
    g.add_argument("--network_weights_high_noise", help="start the high-noise LoRA from these weights")
    g.add_argument("--dim_from_weights", action="store_true", help="take rank and alpha from --network_weights")
    g.add_argument("--network_dim_high_noise", type=int, help="rank of the high-noise LoRA (default --network_dim)")
    g.add_argument("--network_alpha_high_noise", type=float, help="alpha of the high-noise LoRA")

    g = p.add_argument_group("optimization")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="learning rate")
    g.add_argument("--learning_rate_high_noise", type=float, help="learning rate of the high-noise LoRA")
    g.add_argument("--optimizer_type", default="adamw",
                   help="adamw, adamw8bit (bitsandbytes), adafactor (transformers), or module.Class")
    g.add_argument("--optimizer_args", nargs="*", default=[], help="key=value for the optimizer")
    g.add_argument("--lr_scheduler", default="constant",
                   help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    g.add_argument("--lr_warmup_steps", type=float, default=0,
                   help="warm-up steps (a value below 1 is a fraction of the training steps)")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="cosine_with_restarts cycles")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="polynomial power")
    g.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps")
    g.add_argument("--max_train_epochs", type=int, help="epochs (overrides --max_train_steps)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                   help="autocast precision (default: the `accelerate launch` setting, else no)")
    g.add_argument("--seed", type=int, help="seed for everything (default: random, logged)")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop (state saved) after this many non-finite losses in a row")

    g = p.add_argument_group("timesteps")
    g.add_argument("--timestep_sampling", default="uniform",
                   help="uniform, sigmoid, logit_normal, shift, flux_shift, logsnr (docs/training.md)")
    g.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale of sigmoid/shift sampling")
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal mean")
    g.add_argument("--logit_std", type=float, default=1.0, help="logit_normal std")
    g.add_argument("--mode_scale", type=float, default=1.29,
                   help="accepted for musubi-tuner configs and unused: 'mode' weighting is uniform here")
    g.add_argument("--discrete_flow_shift", type=float, default=1.0, help="shift of 'shift' sampling")
    g.add_argument("--min_timestep", type=float, help="lowest timestep trained (0..1000)")
    g.add_argument("--max_timestep", type=float, help="highest timestep trained (0..1000)")
    g.add_argument("--preserve_distribution_shape", action="store_true",
                   help="min/max timestep cut the distribution instead of rescaling it into the range")
    g.add_argument("--weighting_scheme", default="none",
                   help="loss weighting over timesteps: none, sigma_sqrt, cosmap (logit_normal, mode: uniform)")
    g.add_argument("--timestep_boundary", type=float,
                   help="A14B expert boundary, 0..1 or 0..1000 (default: the task's, 0.875 / 0.9)")
    g.add_argument("--show_timesteps", choices=["image", "console"],
                   help="show the timestep distribution (per expert) and exit")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", type=Path, help="where LoRA files, states and samples go (required)")
    g.add_argument("--output_name", default="lora", help="LoRA file name stem")
    g.add_argument("--save_precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype of the saved LoRA tensors")
    g.add_argument("--save_every_n_steps", type=int, help="save every N optimizer steps")
    g.add_argument("--save_every_n_epochs", type=int, help="save every N epochs")
    g.add_argument("--save_last_n_steps", type=int, help="keep only step saves of the last N steps")
    g.add_argument("--save_last_n_epochs", type=int, help="keep only the last N epoch saves")
    g.add_argument("--save_last_n_steps_state", type=int, help="as --save_last_n_steps, for states")
    g.add_argument("--save_last_n_epochs_state", type=int, help="as --save_last_n_epochs, for states")
    g.add_argument("--save_state", action="store_true",
                   help="with every save also write the training state (for --resume)")
    g.add_argument("--save_state_on_train_end", action="store_true", help="write the state at the end")
    g.add_argument("--resume", type=Path, help="continue from a saved state folder")
    g.add_argument("--training_comment", help="free text stored in the LoRA metadata")

    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", type=Path, help="TensorBoard log folder (logging is off without it)")
    g.add_argument("--log_with", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--log_prefix", default="", help="prefix of the run's log folder name")
    g.add_argument("--log_tracker_name", default="wanlora", help="tracker (project) name")

    g = p.add_argument_group("samples during training")
    g.add_argument("--sample_prompts", type=Path, help="prompt file for samples")
    g.add_argument("--sample_every_n_steps", type=int, help="sample every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, help="sample every N epochs")
    g.add_argument("--sample_at_first", action="store_true", help="sample before training")
    g.add_argument("--vae", help="VAE checkpoint (for samples)")
    g.add_argument("--t5", help="umT5 encoder checkpoint (for samples)")
    g.add_argument("--t5_tokenizer", help="umT5 tokenizer folder (for samples)")
    return p


REQUIRED = ("task", "dit", "dataset_config", "output_dir")


def load_config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    """Read a training TOML into ``{dest: value}``, checked against the parser's flags.

    Tables (``[network]``) are flattened: they only group keys. Paths stay strings (argparse's
    ``type`` converts them when the key is a path flag). Values of flags with ``nargs`` may be a
    list or a single string.

    Raises:
        ConfigFileError: unreadable TOML, a key that is no flag (named, with the closest flags),
            a key given twice, or a value of the wrong kind.
    """
    import difflib
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"--config_file {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"--config_file {path}: not valid TOML ({e})") from None

    flat: dict = {}

    def add(key: str, value, where: str) -> None:
        if key in flat:
            raise ConfigFileError(f"--config_file {path}: key '{key}' is given twice ({where})")
        flat[key] = value

    for key, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                add(k, v, f"in [{key}]")
        else:
            add(key, value, "top level")

    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config_file")}
    out = {}
    for key, value in flat.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigFileError(
                f"--config_file {path}: unknown key '{key}' — it is not a wanlora-train flag{hint} "
                "(see `wanlora-train --help`)"
            )
        a = actions[dest]
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigFileError(f"--config_file {path}: '{key}' is a switch; write {key} = true")
        elif a.nargs in ("*", "+"):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list):
                raise ConfigFileError(f"--config_file {path}: '{key}' takes a list of strings")
            value = [str(v) for v in value]
        elif isinstance(value, (list, dict)):
            raise ConfigFileError(f"--config_file {path}: '{key}' takes one value, not {type(value).__name__}")
        if a.type is not None and not isinstance(value, (bool, list)):
            try:
                value = a.type(value)
            except (TypeError, ValueError):
                raise ConfigFileError(f"--config_file {path}: '{key}' = {value!r} is not a valid "
                                      f"{getattr(a.type, '__name__', 'value')}") from None
        if a.choices is not None and not isinstance(value, list) and value not in a.choices:
            raise ConfigFileError(f"--config_file {path}: '{key}' = {value!r}; use one of "
                                  f"{', '.join(map(str, a.choices))}")
        out[dest] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, with ``--config_file`` values as defaults under it.

    Raises:
        SystemExit: argparse errors and missing required flags (argparse's usual message).
        ConfigFileError: see :func:`load_config_file`.
    """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config_file is not None:
        parser.set_defaults(**load_config_file(pre.config_file, parser))
    args = parser.parse_args(argv)
    missing = [f"--{k}" for k in REQUIRED if getattr(args, k) is None]
    if missing and args.show_timesteps is None:
        parser.error(f"missing {', '.join(missing)} (on the command line or in --config_file)")
    if args.show_timesteps is not None and args.task is None:
        parser.error("--show_timesteps needs --task")
    return args
