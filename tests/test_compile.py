"""Regional compilation of the DiT (``WanDiT.compile_blocks``): no graph break inside a block with
LoRA applied, compiled equals eager (float32, CPU inductor) with and without gradient
checkpointing, one graph reused by every block and across bucket shapes.

Tiny dims throughout: inductor's compile time on the CPU, not the model, is the cost here.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.networks.lora_wan import create_network

torch.set_num_threads(1)

TEXT_DIM = 32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code hangs on the block's code object: start and leave every test without any."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dit_with_lora(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=layers, in_channels=16, out_channels=16,
                       text_dim=TEXT_DIM)
    dit = WanDiT(cfg)
    for p in dit.parameters():  # the official init zeroes the head; give every weight a value
        torch.nn.init.normal_(p, std=0.1)
    dit.requires_grad_(False)
    net = create_network(1.0, 4, 4, None, None, dit)
    net.apply_to(None, dit)
    for lora in net.unet_loras:  # a trained-looking LoRA: the zero-initialised up would hide it
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    return dit, net


def _inputs(grid=(2, 4, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, *grid, generator=g), torch.tensor([500.0]),
            torch.randn(1, 5, TEXT_DIM, generator=g))


def _step(dit, net, inputs):
    """Output and LoRA gradients of one forward/backward."""
    for p in net.parameters():
        p.grad = None
    out = dit(*inputs)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def test_block_with_lora_traces_without_graph_breaks():
    dit, _ = _dit_with_lora(layers=1)
    x, t, ctx = _inputs()
    seen = {}
    block = dit.blocks[0]
    hook = block.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args))
    dit(x, t, ctx)
    hook.remove()
    args = list(seen["args"])
    args[0] = args[0].detach().requires_grad_()  # as blocks 1.. see it in training
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # the LoRA hooks are inside the graph: 10 adapters x (down, up) matmuls beside the 10 base ones
    mm = [n for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"
          and "linear" in str(n.target)]
    assert len(mm) == 10 * 3


def test_compiled_blocks_equal_eager_with_lora_plain_and_checkpointed():
    """CPU inductor, float32: output and LoRA gradients as eager (≤ 1e-5), also with gradient
    checkpointing (the recomputation reruns the compiled block; no second compile). One block:
    inductor's C++ build is the cost (about a minute of one core)."""
    dit, net = _dit_with_lora(layers=1)
    inputs = _inputs()
    ref, ref_grads = _step(dit, net, inputs)
    dit.compile_blocks(backend="inductor")
    for checkpointing in (False, True):
        dit.set_gradient_checkpointing(checkpointing)
        out, grads = _step(dit, net, inputs)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
        assert all(g.abs().sum() > 0 for g in grads)


def test_compiling_keeps_module_names_and_lora_keys():
    dit, net = _dit_with_lora()
    keys, lora_keys = list(dit.state_dict()), list(net.state_dict())
    dit.compile_blocks(backend=CompileCounter())
    assert list(dit.state_dict()) == keys and list(net.state_dict()) == lora_keys
    assert dit.compiled_blocks["backend"] is not None


@pytest.mark.parametrize("dynamic,graphs", [(None, 2), (True, 2), (False, 2 * 2)],
                         ids=["auto", "dynamic", "static"])
def test_graphs_are_shared_by_blocks_and_bounded_across_buckets(dynamic, graphs):
    """Two graphs (block 0, whose input needs no gradient, and the other blocks) serve every block;
    with ``dynamic=None`` the token count is marked symbolic, so new bucket shapes reuse them.
    ``dynamic=False`` compiles both per distinct shape."""
    dit, net = _dit_with_lora(layers=3)
    counter = CompileCounter()
    dit.compile_blocks(backend=counter, dynamic=dynamic)
    for grid in [(2, 4, 4), (3, 4, 6), (2, 4, 4)]:
        _step(dit, net, _inputs(grid))
    assert counter.frame_count == graphs


class _TwoBuckets:
    """Fixed batches of two bucket shapes (``ds[pos]``), the trainer's dataset contract."""

    def __init__(self, n=4):
        g = torch.Generator().manual_seed(0)
        grids = [(2, 4, 4), (1, 4, 6)]
        self.b = [{"latents": torch.randn(1, 16, *grids[i % 2], generator=g),
                   "context": [torch.randn(3, 32, generator=g)], "keys": [str(i)]} for i in range(n)]

    def __len__(self):
        return len(self.b)

    def __getitem__(self, pos):
        return self.b[pos % len(self.b)]


def test_training_with_compile_equals_eager(tiny_dir, tmp_path):
    """``--compile`` in the real loop (both A14B experts, gradient checkpointing, two bucket
    shapes): the LoRA files equal an eager run's, no graph break, the graphs stay few. The ``eager``
    backend keeps the test cheap (dynamo tracing; the inductor numerics are checked above)."""
    import json

    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import train

    flags = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    files = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        argv = ["--task", "t2v-A14B", "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
                "--dataset_config", "unused.toml", "--output_dir", str(out), "--output_name", "lora",
                "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "5e-3", "--seed", "3",
                "--max_data_loader_n_workers", "0", "--max_train_steps", "4", "--gradient_checkpointing",
                "--timestep_boundary", "0.5"]
        if compiled:
            argv += ["--compile", "--compile_backend", "eager"]
        torch._dynamo.utils.counters.clear()
        train(parse_config(argv), dataset=_TwoBuckets())
        AcceleratorState._reset_state(reset_partial_state=True)
        files[compiled] = {p.name: load_file(p) for p in sorted(out.glob("*.safetensors"))}
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 2 <= counters["stats"]["unique_graphs"] <= 8
    assert files[True].keys() == files[False].keys() and len(files[True]) == 2
    for name in files[False]:
        for key, ref in files[False][name].items():
            torch.testing.assert_close(files[True][name][key], ref, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("checkpoint_offload", [False, True])
def test_compiled_blocks_with_block_swap_equal_eager(checkpoint_offload):
    """``--compile`` with ``--blocks_to_swap`` (and the checkpoints offloaded): the swap's hook
    runs outside the compiled graph (it moves weights between host and device, which cannot be
    traced), the compiled blocks read whichever slot holds their weights, and outputs and LoRA
    gradients equal the eager model without swapping (the ``eager`` backend executes the
    captured graphs: exact) over two steps, with at most L − N blocks resident."""
    from wanlora.models.block_swap import BlockSwap

    ref, ref_net = _dit_with_lora(layers=4)
    dit, net = _dit_with_lora(layers=4)
    swap = BlockSwap(dit.blocks, 3, "cpu")
    counter = CompileCounter()
    for m in (ref, dit):
        m.set_gradient_checkpointing(True, cpu_offload=checkpoint_offload)
        m.train()
    dit.compile_blocks(backend=counter)
    for step in range(2):
        inputs = _inputs(seed=step)
        want, want_grads = _step(ref, ref_net, inputs)
        out, grads = _step(dit, net, inputs)
        assert torch.equal(out, want)
        for g, w in zip(grads, want_grads):
            assert torch.equal(g, w)
    # the blocks ran compiled, in as many graphs as without swapping (block 0 and the rest; with the
    # offload also the forward's no-grad run): the swap's hook is not traced (traced, its state
    # would be guarded on and recompile for every block: 11 graphs here)
    assert counter.frame_count == (3 if checkpoint_offload else 2) and counter.op_count > 0
    assert swap.copies > 0 and swap.max_resident <= 1
