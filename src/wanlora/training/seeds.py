"""The random streams of a training run, each derived from the run's seed and a position.

Every draw of the loop comes from a ``torch.Generator`` seeded with :func:`derive_seed` of
``(seed, stream, *position)``, never from a global random state carried between steps, so a run
resumed at step ``s`` draws exactly what the uninterrupted run drew there. The mixing is numpy's
``SeedSequence`` (the same as the dataset's shuffle, ``np.random.default_rng([seed, epoch])``),
one formula for every stream:

=====================  =========================================  =====================================
stream                 position                                   draws
=====================  =========================================  =====================================
:data:`NOISE`          optimizer step, micro-batch, process       noise, timesteps, TI2V first frame
:data:`DROPOUT`        optimizer step, micro-batch, process       the network's own dropout (global RNG,
                                                                  forked around the micro-batch)
:data:`EXPERT`         expert group (``step // switch_every``)    which A14B expert trains
:data:`VALIDATION`     validation batch (``--validation_seed``)   the validation loss's noise
=====================  =========================================  =====================================
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["NOISE", "DROPOUT", "EXPERT", "VALIDATION", "derive_seed", "stream_generator"]

NOISE, DROPOUT, EXPERT, VALIDATION = 0, 1, 2, 3

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, stream: int, *position: int) -> int:
    """A seed in ``[0, 2**63)`` for ``stream`` at ``position``, from ``np.random.SeedSequence([seed,
    stream, *position])`` (well mixed: neighbouring steps or processes give unrelated seeds). Negative
    integers are taken modulo ``2**64``."""
    words = np.random.SeedSequence([int(x) & _MASK64 for x in (seed, stream, *position)]).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def stream_generator(seed: int, stream: int, *position: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, *position))
