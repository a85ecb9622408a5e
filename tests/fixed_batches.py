"""Fixed synthetic batches for training tests on the tiny model sets.

``FixedBatches(n)[epoch * n + i]`` is batch ``i``: latents ``[1, c, 2, 4, 4]`` (2 latent frames of
4x4) and one umT5 context ``[3, 32]`` (the tiny text width), drawn from ``seed``; the batches listed in
``nan_at`` have NaN latents (non-finite loss tests). The contract of a ``dataset=`` for
:func:`wanlora.training.trainer.train`.
"""

from __future__ import annotations

import torch


class FixedBatches:
    """``n`` fixed batches (module docstring)."""

    def __init__(self, n: int = 4, seed: int = 0, c: int = 16, nan_at=()):
        g = torch.Generator().manual_seed(seed)
        self.b = [{"latents": torch.randn(1, c, 2, 4, 4, generator=g), "context": [torch.randn(3, 32, generator=g)],
                   "keys": [str(i)]} for i in range(n)]
        for i in nan_at:
            self.b[i]["latents"][:] = float("nan")

    def __len__(self):
        return len(self.b)

    def __getitem__(self, pos):
        return self.b[pos % len(self.b)]
