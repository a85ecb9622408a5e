"""Training under ``torchrun`` on synthetic batches (used by ``test_distributed_commands.py``).

``python distributed_train_probe.py TRAIN_FLAGS...`` (one process or under torchrun) trains on
:class:`SeqBatches` and writes the LoRA as the flags say.
"""

from __future__ import annotations

import sys

import torch


class SeqBatches:
    """Fixed batches whose grid is 3x3x5 = 45 tokens (odd: the sequence is padded for 2 ranks, and
    rank 1's chunk starts inside a frame); ``ds[epoch * n + i]`` = batch i."""

    def __init__(self, n: int = 4, c: int = 16, text_dim: int = 32):
        g = torch.Generator().manual_seed(0)
        self.b = [{"latents": torch.randn(1, c, 3, 6, 10, generator=g),
                   "context": [torch.randn(3 + i, text_dim, generator=g)], "keys": [str(i)]} for i in range(n)]

    def __len__(self):
        return len(self.b)

    def __getitem__(self, pos):
        return self.b[pos % len(self.b)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    from wanlora.commands.args import setup_logging
    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import train

    setup_logging()
    train(parse_config(sys.argv[1:]), dataset=SeqBatches())
