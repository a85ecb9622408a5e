"""The memory model: exact weight counts, the measured activation fit, swap/offload/expert
accounting, and the dataset's largest clip."""

from __future__ import annotations

import pytest
import torch

from wanlora.training.memory import (GiB, MemorySettings, block_activation_bytes, dit_weight_bytes,
                                     estimate_memory, lora_parameter_count, token_count)


def test_token_counts_and_errors():
    assert token_count("t2v-A14B", 832, 480, 81) == 21 * 30 * 52
    assert token_count("ti2v-5B", 1280, 704, 121) == 31 * 22 * 40
    with pytest.raises(ValueError, match="4n\\+1"):
        token_count("t2v-A14B", 832, 480, 80)
    with pytest.raises(ValueError, match="multiples of 16"):
        token_count("t2v-A14B", 830, 480, 81)


def test_weights_are_counted_exactly():
    block, outside = dit_weight_bytes("t2v-A14B", torch.bfloat16)
    assert 40 * block + outside == 28_952_279_296  # the bf16 expert with its float32 islands
    block8, outside8 = dit_weight_bytes("t2v-A14B", torch.bfloat16, "base")
    assert outside8 == outside and block - block8 == (4 * 5120 * 5120 * 2 + 2 * 5120 * 13824)
    scaled, _ = dit_weight_bytes("t2v-A14B", torch.bfloat16, "scaled")
    assert scaled - block8 == 4 * (8 * 5120 + 13824 + 5120)  # one float32 scale per output row
    assert lora_parameter_count("t2v-A14B", 32) == 40 * 32 * (8 * 2 * 5120 + 2 * (5120 + 13824))


def test_parts_move_between_device_and_host():
    base = dict(task="t2v-A14B", width=832, height=480, frames=81, rank=32, fp8="base")
    plain = estimate_memory(MemorySettings(**base))
    swap = estimate_memory(MemorySettings(**base, blocks_to_swap=20))
    block, _ = dit_weight_bytes("t2v-A14B", torch.bfloat16, "base")
    assert plain.device["DiT weights"] - swap.device["DiT weights"] == 20 * block
    assert swap.host["block swap (pinned blocks)"] == 40 * block  # min(L, 2N) blocks move
    off = estimate_memory(MemorySettings(**base, blocks_to_swap=20, checkpoint_offload=True))
    ckpt = 40 * 32760 * 5120 * 4
    assert off.host["block checkpoints (float32)"] == ckpt and swap.device["block checkpoints (float32)"] == ckpt
    assert swap.device_total - off.device_total == ckpt
    two = estimate_memory(MemorySettings(**base, experts=2))
    parked = estimate_memory(MemorySettings(**base, experts=2, offload_inactive=True))
    assert two.device_total - plain.device_total == parked.host["inactive expert (pinned)"] + \
        plain.device["LoRA + grads + AdamW"]
    assert "fits" in off.format() and "GiB" in off.format()
    with pytest.raises(ValueError, match="--blocks_to_swap"):
        estimate_memory(MemorySettings(**{**base, "fp8": None}, blocks_to_swap=40))


def test_block_activation_uses_the_measured_line():
    a = block_activation_bytes("t2v-A14B", "train", 1000, "cpu")
    b = block_activation_bytes("t2v-A14B", "train", 2000, "cpu")
    assert b - a == pytest.approx(475861 * 1000, rel=1e-6)
    # on CUDA the CPU-only packed weight copy is not in the constant
    assert a - block_activation_bytes("t2v-A14B", "train", 1000, "cuda") == dit_weight_bytes(
        "t2v-A14B", torch.bfloat16)[0]
    # 1.3B: a measured width; the 14B fit at 32,760 tokens is about 14.6 GiB
    assert 14 * GiB < block_activation_bytes("t2v-A14B", "train", 32760) < 15.5 * GiB
