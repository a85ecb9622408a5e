"""``wanlora-train``: train a LoRA on a Wan DiT.

Run it under Accelerate (one or several GPUs) or torchrun (several CPU processes, gloo)::

    accelerate launch -m wanlora.train --task t2v-A14B \\
        --dit MODELS/low_noise_model --dit_high_noise MODELS/high_noise_model \\
        --dataset_config dataset.toml --network_module networks.lora_wan --network_dim 16 \\
        --output_dir output --output_name mylora
    accelerate launch -m wanlora.train --config_file train.toml --learning_rate 1e-4

The flags are the fields of :class:`wanlora.training.config.TrainConfig` (``--help``); any of them
may come from the TOML ``--config_file`` (:mod:`wanlora.commands.args`). The loop is
:func:`wanlora.training.trainer.train`, the guide ``docs/training.md``. Exit status: 0 done, 2 a
user error (flags, files, caches; the message names the fix; ``WANLORA_TRACEBACK=1`` shows the
traceback), 3 stopped on non-finite losses (state saved).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from wanlora.commands.args import CommandLine, ConfigFileError, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.run_config import group, option
from wanlora.training.config import TrainConfig

__all__ = ["main", "TrainCommand", "build_parser", "parse_args", "parse_command", "parse_config",
           "load_config_file", "ConfigFileError"]

REQUIRED = ("task", "dit", "dataset_config", "output_dir")


@dataclass(frozen=True)
class TrainCommand:
    """What ``wanlora-train`` is asked: a run, or only to show its timestep distribution."""

    run: TrainConfig = group(TrainConfig, "")
    show_timesteps: str | None = option(None, "show the timestep distribution (per expert) and exit",
                                        choices=("image", "console"))


def command_line() -> CommandLine:
    """The ``wanlora-train`` command line."""
    return CommandLine("wanlora-train", "Train a LoRA on a Wan2.2 / Wan2.1 DiT from cached latents and text "
                       "(run under `accelerate launch -m wanlora.train ...`).", TrainCommand)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-train`` (built-in defaults; no config file applied)."""
    return command_line().parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv`` over its ``--config_file`` over the defaults, as a flat namespace.

    Raises:
        SystemExit: argparse errors and missing required flags (argparse's usual message).
        ConfigFileError: an unusable ``--config_file`` (named key, file and fix).
    """
    cl = command_line()
    ns = cl.parse_namespace(argv, ckpt_groups=_ckpt_groups)
    required = ("task",) if ns.show_timesteps is not None else (
        ("task", "dit", "dataset_config") if ns.estimate_memory else REQUIRED)
    missing = [f"--{k}" for k in required if getattr(ns, k) is None]
    if missing:
        cl.error(f"missing {', '.join(missing)} (on the command line or in --config_file)")
    return ns


def _ckpt_groups(ns) -> tuple[str, ...]:
    """What training takes from ``--ckpt_dir``: the DiT(s); the VAE, umT5 (and CLIP for the Wan2.1
    image tasks) only to render samples; nothing for ``--show_timesteps``."""
    if ns.show_timesteps is not None:
        return ()
    return ("dit", "vae", "t5", "clip") if ns.sample_prompts else ("dit",)


def parse_command(argv: list[str] | None = None) -> TrainCommand:
    """:func:`parse_args` as the typed, frozen :class:`TrainCommand`."""
    return config_from_namespace(TrainCommand, parse_args(argv))


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The :class:`~wanlora.training.config.TrainConfig` of a ``wanlora-train`` command line."""
    return parse_command(argv).run


def load_config_file(path: str | Path) -> dict:
    """``{flag: value}`` of a training TOML, checked against the flags
    (:meth:`wanlora.commands.args.CommandLine.load_config_file`)."""
    return command_line().load_config_file(Path(path))


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the exit status; user errors
    (flags, ``--config_file``, files, caches, missing packages) print ``wanlora-train: error: <message>``
    (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-train", _main, argv)


def _main(argv: list[str] | None) -> int:
    from wanlora.commands.preflight import preflight_train
    from wanlora.training.trainer import NonFiniteLossError, plan_run, train

    ns = parse_args(argv)
    setup_logging(ns.verbose)
    command = config_from_namespace(TrainCommand, ns)
    config = command.run
    if command.show_timesteps is not None:
        from wanlora.training.timestep_plots import describe_timesteps

        _, plan, distribution, _ = plan_run(config)
        image = Path(config.saving.output_dir or ".") / f"{config.saving.output_name}_timesteps.png"
        print(describe_timesteps(distribution, plan, command.show_timesteps, image))
        return 0
    if config.model.estimate_memory:
        from wanlora.training.memory import estimate_for_training

        print(estimate_for_training(config).format())
        return 0
    preflight_train(config)  # folders, numbers, ranks, the samples' VAE: before the dataset and the DiT
    try:
        train(config)
    except NonFiniteLossError as e:
        logging.getLogger("wanlora.train").error("%s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
