"""``wanlora-train``: train a LoRA on a Wan DiT.

Run it under Accelerate (one or several GPUs) or torchrun (several CPU processes, gloo)::

    accelerate launch -m wanlora.train --task t2v-A14B \\
        --dit MODELS/low_noise_model --dit_high_noise MODELS/high_noise_model \\
        --dataset_config dataset.toml --network_module networks.lora_wan --network_dim 16 \\
        --output_dir output --output_name mylora
    accelerate launch -m wanlora.train --config_file train.toml --learning_rate 1e-4

The flags are in :mod:`wanlora.commands.train_args` (``--help``), the loop in :mod:`wanlora.training.trainer`,
the guide in ``docs/training.md``. Exit status: 0 done, 2 a user error (flags, files, caches;
the message names the fix; ``WANLORA_TRACEBACK=1`` shows the traceback), 3 stopped on
non-finite losses (state saved).
"""

from __future__ import annotations

import logging
import sys

from wanlora.commands.cli import run_cli

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the exit status; user errors
    (flags, ``--config_file``, files, caches, missing packages) print ``wanlora-train: error: <message>``
    (:func:`wanlora.commands.cli.run_cli`)."""
    return run_cli("wanlora-train", _main, argv)


def _main(argv: list[str] | None) -> int:
    from wanlora.commands.train_args import parse_args
    from wanlora.training.trainer import NonFiniteLossError, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        train(args)
    except NonFiniteLossError as e:
        logging.getLogger("wanlora.train").error("%s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
