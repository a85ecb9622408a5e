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

import argparse
import logging
import sys

from wanlora.commands.cli import run_cli
from wanlora.tasks import task_names

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wanlora-download``."""
    p = argparse.ArgumentParser(prog="wanlora-download", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=task_names(), help="which Wan model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--repo", help="Hugging Face repo id (default: the task's official Wan-AI repository)")
    src.add_argument("--diffusers", action="store_true",
                     help="the task's diffusers-format repository (Wan-AI/...-Diffusers)")
    p.add_argument("--expert", choices=["high", "low"],
                   help="A14B tasks: only this expert's DiT (e.g. to train one expert)")
    p.add_argument("--only", nargs="+", choices=["dit", "vae", "t5", "clip"], default=["dit", "vae", "t5", "clip"],
                   help="model file groups to fetch (default: all; t5 includes the tokenizer; clip: the CLIP "
                        "image encoder of i2v-14B / flf2v-14B)")
    p.add_argument("--dir", help="put the files in this folder (then --ckpt_dir DIR) instead of the HF cache")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, fetch, print the resolved files (stderr) and the ``--ckpt_dir`` (stdout);
    errors are one line and exit status 2 (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-download", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wanlora.models.checkpoints import resolve_ckpt_dir, roles_for
    from wanlora.tasks import get_task

    task = get_task(args.task)
    if task.release is None and not args.repo:
        raise ValueError(f"task {task.name} has no published repository in the table; name one with --repo")
    repo = args.repo or (task.release.diffusers_repo if args.diffusers else task.release.repo)
    roles = roles_for(task, args.only, expert=args.expert)
    files = resolve_ckpt_dir(repo, task, roles, download=True, local_dir=args.dir, revision=args.revision)
    print(files.describe(), file=sys.stderr)
    print(args.dir if args.dir else repo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
