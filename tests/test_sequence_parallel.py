"""Ulysses sequence parallelism and the FSDP2-sharded DiT equal one process (2 gloo processes, float32).

Each check spawns 2 CPU processes (``torch.multiprocessing``, gloo). Every process builds the same
random tiny DiT (4 heads, 2 per rank) with a LoRA network, runs it once alone (the reference) and
once split over the sequence group, and compares forward outputs and LoRA gradients. Grids with
an odd token count (padding) and per-frame timesteps (chunks that start inside a frame) are used.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.dit_oracle import random_dit_state_dict
from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.distributed import parallel_layout, shard_dit
from wanlora.models.sequence_parallel import check_ulysses_heads
from wanlora.networks.lora_wan import create_network

CFG = dict(dim=64, ffn_dim=96, num_heads=4, num_layers=2, in_channels=16, out_channels=16, text_dim=32,
           text_len=16)


def _spawn(port: int, fn, *args, world: int = 2):
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes meeting at 127.0.0.1:``port``; a
    failure in any re-raises here."""
    # fork: the children inherit the imported modules (a spawned child re-imports torch: ~10 s)
    mp.start_processes(_worker, args=(world, port, fn, args), nprocs=world, join=True, start_method="fork")


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _dit_and_lora(grad_checkpointing: bool = False, segments: int = 0):
    torch.manual_seed(0)
    dit = WanDiT(WanDiTConfig(**CFG))
    dit.load_state_dict(random_dit_state_dict(dit.config, seed=1))
    dit.requires_grad_(False)
    dit.set_gradient_checkpointing(grad_checkpointing, segments=segments)
    net = create_network(1.0, 4, 4, None, None, dit)
    net.apply_to(None, dit)
    for m in net.modules():  # non-zero up weights, so every adapter has a gradient
        if isinstance(m, torch.nn.Linear) and m.weight.shape[1] == 4:
            torch.nn.init.normal_(m.weight, std=0.2)
    return dit, net


def _inputs(frames: int, h: int, w: int, per_frame_t: bool):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, frames, h, w, generator=g)
    t = torch.rand(2, frames, generator=g) * 1000 if per_frame_t else torch.tensor([900.0, 125.0])
    ctx = [torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)]
    target = torch.randn(2, 16, frames, h, w, generator=g)
    return x, t, ctx, target


def _loss_and_grads(dit, net, inputs):
    x, t, ctx, target = inputs
    net.zero_grad(set_to_none=True)
    out = dit(x, t, ctx)
    ((out - target) ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _sp_matches_one_process(rank, world, shapes, grad_checkpointing, segments=0):
    layout = parallel_layout(ulysses_size=world)
    assert (layout.dp_size, layout.sp_size, layout.sp_rank) == (1, world, rank)
    dit, net = _dit_and_lora(grad_checkpointing, segments)
    for frames, h, w, per_frame_t in shapes:
        inputs = _inputs(frames, h, w, per_frame_t)
        dit.set_sequence_parallel(None)
        ref_out, ref_grads = _loss_and_grads(dit, net, inputs)
        dit.set_sequence_parallel(layout.sequence_parallel())
        out, grads = _loss_and_grads(dit, net, inputs)
        assert _rel(out, ref_out) < 1e-5, (frames, h, w, _rel(out, ref_out))
        for name, g in grads.items():  # the data-parallel mean over the group, as DDP takes it
            dist.all_reduce(g)
            g /= world
            assert _rel(g, ref_grads[name]) < 1e-5, (name, _rel(g, ref_grads[name]))


def _sp_cases(rank, world):
    # 3x(6/2)x(10/2) = 45 tokens: padded to 2x23, chunk 1 starts inside frame 1; per-frame and
    # per-sample timesteps; 4x3x5 = 60 tokens: chunks of two whole frames.
    _sp_matches_one_process(rank, world, [(3, 6, 10, True), (3, 6, 10, False), (4, 6, 10, True)], False)
    _sp_matches_one_process(rank, world, [(3, 6, 10, True)], True)  # gradient checkpointing
    _sp_matches_one_process(rank, world, [(3, 6, 10, True)], True, segments=1)  # two-level


def test_ulysses_forward_and_lora_gradients_equal_one_process(free_port):
    _spawn(free_port(), _sp_cases)


def test_heads_not_divisible_is_one_line_error():
    check_ulysses_heads(40, 8)
    with pytest.raises(ValueError, match=r"--ulysses_size 3 must divide the DiT's 4 attention heads; use one of 1, 2, 4"):
        check_ulysses_heads(4, 3)

    class _Group3:
        size = 3

    with pytest.raises(ValueError, match="--ulysses_size 3"):
        WanDiT(WanDiTConfig(**CFG)).set_sequence_parallel(_Group3())


def test_layout_needs_processes():
    with pytest.raises(ValueError, match="--ulysses_size 2 needs several processes"):
        parallel_layout(ulysses_size=2)
    with pytest.raises(ValueError, match="--dit_fsdp needs several processes"):
        parallel_layout(fsdp=True)
    assert parallel_layout().describe().startswith("world 1 = 1 data-parallel × 1 sequence-parallel")


def _fsdp_matches_replicated(rank, world, ulysses, segments=0):
    layout = parallel_layout(ulysses_size=ulysses, fsdp=True)
    inputs = _inputs(3, 6, 10, True)
    dit, net = _dit_and_lora()
    ref_out, ref_grads = _loss_and_grads(dit, net, inputs)
    full = {k: v.clone() for k, v in dit.state_dict().items()}
    shard_dit(dit, layout)
    local = dit.blocks[0].self_attn.q.weight.to_local()
    assert local.shape[0] == CFG["dim"] // world  # each rank holds half of every weight
    dit.set_sequence_parallel(layout.sequence_parallel())
    dit.set_gradient_checkpointing(bool(segments), segments=segments)
    out, grads = _loss_and_grads(dit, net, inputs)
    assert _rel(out, ref_out) < 1e-5
    for name, g in grads.items():
        dist.all_reduce(g)
        g /= world
        assert _rel(g, ref_grads[name]) < 1e-5, name
    # the base stays frozen and unchanged
    for k, v in dit.state_dict().items():
        assert torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, full[k]), k


def test_fsdp_sharded_dit_equals_replicated(free_port):
    _spawn(free_port(), _fsdp_matches_replicated, 1)


def test_fsdp_with_ulysses_equals_replicated(free_port):
    _spawn(free_port(), _fsdp_matches_replicated, 2)


def test_fsdp_with_checkpoint_segments_equals_replicated(free_port):
    _spawn(free_port(), _fsdp_matches_replicated, 1, 1)
