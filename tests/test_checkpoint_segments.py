"""``--gradient_checkpointing_segments``: two-level checkpointing keeps S + ceil(L/S) float32 block
inputs instead of L, and computes the same outputs and gradients as per-block checkpointing, bit for
bit (models/dit.py: WanDiT.set_gradient_checkpointing)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from wanlora.models.dit import WanDiT, WanDiTConfig, _split
from wanlora.training.memory import MemorySettings, estimate_memory
from wanlora.training.trainer import train

from fixed_batches import FixedBatches
from test_train import _args

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after

LAYERS = 5


def _model() -> WanDiT:
    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=LAYERS, in_channels=16, out_channels=16,
                       text_dim=32)
    return WanDiT(cfg).train()


def _step(m: WanDiT, **ckpt):
    """Output and every block parameter's gradient of one forward + backward."""
    torch.manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 2, 4, 6), torch.tensor([421.0]), torch.randn(1, 7, 32)
    m.zero_grad(set_to_none=True)
    m.set_gradient_checkpointing(True, **ckpt)
    out = m(x, t, ctx)
    out.square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in m.blocks.named_parameters()}


def test_split_is_consecutive_and_even():
    blocks = _model().blocks
    for n in range(1, LAYERS + 1):
        parts = _split(blocks, n)
        assert len(parts) == n and [b for p in parts for b in p] == list(blocks)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("segments", [1, 2, 3, LAYERS])
def test_segments_give_the_same_output_and_gradients_bit_for_bit(segments):
    m = _model()
    ref_out, ref_grads = _step(m)
    out, grads = _step(m, segments=segments)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def _kept_block_inputs(m: WanDiT, **ckpt) -> int:
    """How many float32 ``[B, L, D]`` tensors the forward saves for backward (the residual stream)."""
    seen = []

    def pack(t):
        if t.dtype == torch.float32 and t.shape == (1, 12, 64) and all(t is not s for s in seen):
            seen.append(t)
        return t

    m.set_gradient_checkpointing(True, **ckpt)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(torch.randn(1, 16, 2, 4, 6), torch.tensor([421.0]), torch.randn(1, 7, 32))
    return len(seen)


def test_segments_keep_fewer_block_inputs():
    m = _model()
    m.requires_grad_(False)
    m.blocks[0].self_attn.q.weight.requires_grad_(True)
    plain = _kept_block_inputs(m)
    head = plain - LAYERS  # what the head saves besides the block inputs
    assert head >= 0
    for s in (1, 2, 3):
        assert _kept_block_inputs(m, segments=s) == s + head


def test_segment_errors():
    m = _model()
    with pytest.raises(ValueError, match=r"give 0 \(off\) .. 5"):
        m.set_gradient_checkpointing(True, segments=LAYERS + 1)
    with pytest.raises(ValueError, match="choose one"):
        m.set_gradient_checkpointing(True, cpu_offload=True, segments=2)


def test_estimate_counts_the_kept_block_inputs():
    s = dict(task="t2v-A14B", width=1280, height=720, frames=81, fp8="scaled")
    plain, seg = estimate_memory(MemorySettings(**s)), estimate_memory(MemorySettings(**s, checkpoint_segments=6))
    one = 75600 * 5120 * 4  # one float32 block input at 1280x720x81
    assert plain.device["block checkpoints (float32)"] == 40 * one
    assert seg.device["block checkpoints (float32, 13/40)"] == (6 + math.ceil(40 / 6)) * one
    assert plain.device_total - seg.device_total == 27 * one


def test_training_with_segments_saves_the_same_lora(tiny_dir, tmp_path):
    from accelerate.state import AcceleratorState

    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    common = ("--expert", "low", "--gradient_checkpointing", "--max_train_steps", "3")
    train(_args(flags, "unused.toml", tmp_path / "a", *common), dataset=FixedBatches())
    AcceleratorState._reset_state(reset_partial_state=True)
    train(_args(flags, "unused.toml", tmp_path / "b", *common, "--gradient_checkpointing_segments", "1"),
          dataset=FixedBatches())
    a, b = load_file(tmp_path / "a" / "lora.safetensors"), load_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for extra, match in ((("--blocks_to_swap", "1"), "choose one"),
                         (("--gradient_checkpointing_cpu_offload",), "choose one"),
                         (("--gradient_checkpointing_segments", "9"), "give 0")):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(ValueError, match=match):
            train(_args(flags, "unused.toml", tmp_path / "c", *common, "--gradient_checkpointing_segments", "1",
                        *extra), dataset=FixedBatches())
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="needs --gradient_checkpointing"):
        train(_args(flags, "unused.toml", tmp_path / "d", "--expert", "low", "--gradient_checkpointing_segments", "1",
                    "--max_train_steps", "1"), dataset=FixedBatches())


def test_segments_with_compiled_blocks():
    """Regional compilation (aot_eager: autograd traced, no C++ build) under two-level
    checkpointing: the compiled blocks run in the forward, the segment recomputation and the block
    recomputation, and give eager's output and gradients."""
    m = _model()
    ref_out, ref_grads = _step(m)
    m.compile_blocks(backend="aot_eager")
    out, grads = _step(m, segments=2)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-5, atol=1e-6)


def test_segments_cost_one_more_forward_per_block():
    """The price: every block but the last of each segment runs forward 3 times per step (forward,
    segment recomputation, block recomputation) instead of 2 — the segment recomputation stops
    once it has rebuilt the last block's input (PyTorch's early stop) — so L − S extra block
    forwards; with one segment per block nothing more."""
    m = _model()
    calls = []
    for i, block in enumerate(m.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    for segments, last in ((0, range(LAYERS)), (1, [4]), (2, [2, 4]), (LAYERS, range(LAYERS))):
        calls.clear()
        _step(m, segments=segments)
        assert [calls.count(i) for i in range(LAYERS)] == [2 if i in last else 3 for i in range(LAYERS)], segments
