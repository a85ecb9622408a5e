"""``wanlora-download``: fetch a task's checkpoints ahead of time and print the ``--ckpt_dir`` to use.

    wanlora-download --task t2v-A14B                  # both experts, VAE, umT5 -> the HF cache
    wanlora-download --task t2v-A14B --expert high    # one expert (training one expert)
    wanlora-download --task ti2v-5B --dir /models/ti2v-5B   # into a folder instead of the cache
    wanlora-download --task t2v-1.3B --diffusers --only vae  # the diffusers repo, only the VAE

Only the files the roles need are fetched (never the whole repository), from the local Hugging Face
cache first; downloads resume and show progress bars. The last line on stdout is the value to pass
as ``--ckpt_dir`` (the repo id when the files are in the cache, the folder with ``--dir``), so
``CKPT=$(wanlora-download --task ti2v-5B)`` works. Exit status 0, or 2 with one line when a file
cannot be fetched (offline, no network, unknown repository).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from wanlora.commands.args import CommandLine, config_from_namespace, setup_logging
from wanlora.commands.cli import run_cli
from wanlora.run_config import option
from wanlora.tasks import task_names

__all__ = ["DownloadConfig", "command_line", "build_parser", "main"]

_GROUPS = ("dit", "vae", "t5", "clip")


@dataclass(frozen=True)
class DownloadConfig:
    """The settings of ``wanlora-download`` (also from ``--config_file``)."""

    task: str | None = option(None, "which Wan model (required)", choices=task_names)
    repo: str | None = option(None, "Hugging Face repo id (default: the task's official Wan-AI repository)")
    diffusers: bool = option(False, "the task's diffusers-format repository (Wan-AI/...-Diffusers)")
    expert: str | None = option(None, "A14B tasks: only this expert's DiT (e.g. to train one expert)",
                                choices=("high", "low"))
    only: tuple[str, ...] = option(_GROUPS, "model file groups to fetch (t5 includes the tokenizer; clip: the "
                                   "CLIP image encoder of i2v-14B / flf2v-14B)", nargs="+", choices=_GROUPS)
    dir: str | None = option(None, "put the files in this folder (then --ckpt_dir DIR) instead of the HF cache")
    revision: str | None = option(None, "branch, tag or commit (default: main)")


def command_line() -> CommandLine:
    """The ``wanlora-download`` command line."""
    return CommandLine("wanlora-download", __doc__.split("\n\n")[0], DownloadConfig)


def build_parser():
    """The argument parser of ``wanlora-download``."""
    return command_line().parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, fetch, print the resolved files (stderr) and the ``--ckpt_dir`` (stdout);
    errors are one line and exit status 2 (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-download", _main, argv)


def _main(argv: list[str] | None) -> int:
    ns = command_line().parse_namespace(argv, required=("task",))
    setup_logging(ns.verbose)
    config = config_from_namespace(DownloadConfig, ns)
    from wanlora.models.checkpoints import resolve_ckpt_dir, roles_for
    from wanlora.tasks import get_task

    if config.repo and config.diffusers:
        raise ValueError("--repo and --diffusers both name the repository; give one of them")
    task = get_task(config.task)
    if task.release is None and not config.repo:
        raise ValueError(f"task {task.name} has no published repository in the table; name one with --repo")
    repo = config.repo or (task.release.diffusers_repo if config.diffusers else task.release.repo)
    roles = roles_for(task, config.only, expert=config.expert)
    files = resolve_ckpt_dir(repo, task, roles, download=True, local_dir=config.dir, revision=config.revision)
    print(files.describe(), file=sys.stderr)
    print(config.dir if config.dir else repo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
