"""The random streams of a training run (wanlora.training.seeds): one mixing formula, stable,
well separated."""

from __future__ import annotations

import numpy as np
import torch

from wanlora.training import seeds


def test_derive_seed_is_numpys_seed_sequence_and_deterministic():
    s = seeds.derive_seed(7, seeds.NOISE, 3, 0, 1)
    words = np.random.SeedSequence([7, seeds.NOISE, 3, 0, 1]).generate_state(2, np.uint32)
    assert s == ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)
    assert s == seeds.derive_seed(7, seeds.NOISE, 3, 0, 1) and 0 <= s < 2**63


def test_streams_and_neighbouring_positions_differ():
    made = {seeds.derive_seed(seed, stream, step, micro, proc)
            for seed in (0, 1) for stream in (seeds.NOISE, seeds.DROPOUT, seeds.EXPERT)
            for step in range(20) for micro in range(3) for proc in range(2)}
    assert len(made) == 2 * 3 * 20 * 3 * 2  # no two positions share a seed
    assert seeds.derive_seed(-1, 0) == seeds.derive_seed(2**64 - 1, 0)  # negatives modulo 2**64


def test_stream_generator_draws_are_reproducible():
    a = torch.rand(4, generator=seeds.stream_generator(5, seeds.EXPERT, 9))
    b = torch.rand(4, generator=seeds.stream_generator(5, seeds.EXPERT, 9))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(4, generator=seeds.stream_generator(5, seeds.EXPERT, 10)))
