"""Block swap on the CPU (the host->host schedule): bit-identical outputs and LoRA gradients to no
swapping, at most L - N blocks resident at any time, the right block resident when it computes."""

from __future__ import annotations

import pytest
import torch

from wanlora.io_utils import save_safetensors
from wanlora.models import load_dit
from wanlora.models.block_swap import BlockSwap

from test_loading import make_sd

torch.set_num_threads(1)

LAYERS = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    sd, cfg = make_sd(num_layers=LAYERS)
    path = tmp_path_factory.mktemp("swap") / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    return path, cfg


def _model_with_lora(path, fp8):
    from wanlora.networks.lora_wan import create_network

    m = load_dit(path, "t2v-A14B", dtype="fp32", fp8=fp8)
    torch.manual_seed(0)
    net = create_network(1.0, 4, 4.0, None, None, m)
    net.apply_to(None, m)
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if "lora_up" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.02
    net.requires_grad_(True)
    m.set_gradient_checkpointing(True)
    m.train()
    return m, net


def _step(m, net, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 3, cfg.text_dim, generator=g)
    net.zero_grad(set_to_none=True)
    out = m(x, torch.tensor([300.0 + seed]), ctx)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("n_swap, fp8", [(1, None), (3, "scaled"), (4, None)])
def test_swap_is_bit_identical_and_bounded(ckpt, n_swap, fp8):
    path, cfg = ckpt
    ref_m, ref_net = _model_with_lora(path, fp8)
    m, net = _model_with_lora(path, fp8)
    swap = BlockSwap(m.blocks, n_swap, "cpu")
    k = LAYERS - n_swap
    seen = []

    def check(j):
        def hook(module, args):
            # the block computing is resident, its weights are a slot's (or never moved) and
            # equal its own host copy; never more than K resident
            assert j in swap.resident and len(swap.resident) <= k
            if j in swap.slot_of:
                slot = swap.slots[swap.slot_of[j]]
                q = m.blocks[j].self_attn.q.weight
                assert q.data_ptr() == slot["self_attn.q.weight"].data_ptr()
                assert torch.equal(q.view(torch.uint8) if q.dtype != torch.float32 else q,
                                   swap.host[j]["self_attn.q.weight"].view(torch.uint8)
                                   if q.dtype != torch.float32 else swap.host[j]["self_attn.q.weight"])
            seen.append(j)
        return hook

    for j, b in enumerate(m.blocks):
        b.register_forward_pre_hook(check(j))
    for step in range(2):  # the second step starts from where the first backward left the window
        want_out, want_grads = _step(ref_m, ref_net, cfg, step)
        out, grads = _step(m, net, cfg, step)
        assert torch.equal(out, want_out)
        for n, gr in want_grads.items():
            assert torch.equal(grads[n], gr), n
    assert swap.max_resident <= k
    # forward 0..L-1 then the backward recomputation L-1..0, per step
    assert seen == (list(range(LAYERS)) + list(range(LAYERS - 1, -1, -1))) * 2
    assert swap.copies > 0
    with torch.no_grad():  # generation: forwards only, the window wraps back to block 0
        for _ in range(2):
            x = torch.randn(1, cfg.in_channels, 2, 4, 4)
            ctx = torch.randn(1, 3, cfg.text_dim)
            assert torch.equal(m(x, torch.tensor([500.0]), ctx), ref_m(x, torch.tensor([500.0]), ctx))


def test_blocks_that_never_move_and_bad_counts(ckpt):
    path, cfg = ckpt
    m = load_dit(path, "t2v-A14B", dtype="fp32")
    swap = BlockSwap(m.blocks, 1, "cpu")  # K = 5: blocks 1..4 stay, 0 and 5 share one slot
    assert swap.permanent == {1, 2, 3, 4} and len(swap.slots) == 1 and set(swap.host) == {0, 5}
    m2 = load_dit(path, "t2v-A14B", dtype="fp32")
    for bad in (0, LAYERS):
        with pytest.raises(ValueError, match="--blocks_to_swap"):
            BlockSwap(m2.blocks, bad, "cpu")
    with pytest.raises(ValueError, match="--gradient_checkpointing"):
        swap.check_training(False)


def _nbytes(sd):
    return sum(t.numel() * t.element_size() for t in sd.values())


@pytest.mark.parametrize("n_swap", [None, 3])
def test_offload_parks_only_the_inactive_expert(tmp_path, n_swap):
    """--offload_inactive_dit: one expert's weights on the host (the inactive one), exchanged on
    each switch; with block swap the swapped blocks of both experts wait on the host and a switch
    only re-points the swap. Outputs equal each expert loaded alone, bit for bit."""
    from wanlora.training.experts import ExpertWeights, base_tensors

    paths, cfg = {}, None
    for seed, e in enumerate(("low_noise", "high_noise")):
        sd, cfg = make_sd(num_layers=LAYERS, seed=seed)
        paths[e] = tmp_path / f"{e}.safetensors"
        save_safetensors(sd, paths[e], metadata={"num_heads": "2"})
    refs = {e: load_dit(p, "t2v-A14B", dtype="fp32", fp8="scaled") for e, p in paths.items()}
    m = load_dit(paths["low_noise"], "t2v-A14B", dtype="fp32", fp8="scaled")
    swap = BlockSwap(m.blocks, n_swap, "cpu") if n_swap else None
    other = dict(base_tensors(load_dit(paths["high_noise"], "t2v-A14B", dtype="fp32", fp8="scaled")))
    one_expert = _nbytes(other)
    w = ExpertWeights(m, "low_noise", {"high_noise": other}, offload=True, swap=swap)
    assert not other  # consumed: no second host copy kept
    swapped = set() if swap is None else {f"blocks.{j}.{n}" for j in swap.host for n in swap.names}
    want_parked = one_expert - _nbytes({k: v for k, v in base_tensors(refs["low_noise"]).items() if k in swapped})
    assert list(w.store) == ["high_noise"] and w.parked_bytes() == want_parked
    x = torch.randn(1, cfg.in_channels, 2, 4, 4)
    ctx = torch.randn(1, 3, cfg.text_dim)
    t = torch.tensor([600.0])
    with torch.no_grad():
        for e in ("high_noise", "low_noise", "high_noise"):
            assert w.activate(e)
            assert list(w.store) == [{"high_noise": "low_noise", "low_noise": "high_noise"}[e]]
            assert w.parked_bytes() == want_parked  # never both experts
            assert torch.equal(m(x, t, ctx), refs[e](x, t, ctx)), e


def _lora_grads(m, net, cfg, dropout_seed=3):
    torch.manual_seed(dropout_seed)  # LoRA dropout draws: the recomputation must replay them
    return _step(m, net, cfg, 0)


@pytest.mark.parametrize("with_swap", [False, True])
def test_cpu_offloaded_checkpoints_give_equal_gradients(ckpt, with_swap):
    """--gradient_checkpointing_cpu_offload: outputs and LoRA gradients equal plain
    checkpointing bit for bit (also with LoRA dropout and block swap); a bf16 stash is close."""
    path, cfg = ckpt
    results = {}
    for mode in ("plain", "offload", "offload_bf16"):
        m, net = _model_with_lora(path, "scaled")
        for lora in net.modules():
            if hasattr(lora, "dropout") and hasattr(lora, "lora_down"):
                lora.dropout = 0.1
        if with_swap:
            BlockSwap(m.blocks, 3, "cpu")
        m.set_gradient_checkpointing(True, cpu_offload=mode != "plain",
                                     stash_dtype=torch.bfloat16 if mode == "offload_bf16" else None)
        results[mode] = _lora_grads(m, net, cfg)
    out, grads = results["plain"]
    assert torch.equal(results["offload"][0], out)
    for n, g in grads.items():
        assert torch.equal(results["offload"][1][n], g), n
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    flat16 = torch.cat([results["offload_bf16"][1][n].reshape(-1) for n in grads])
    assert not torch.equal(flat, flat16)
    assert torch.nn.functional.cosine_similarity(flat, flat16, dim=0) > 0.999


def test_two_models_share_one_set_of_slots(tmp_path):
    """Generation with both A14B experts: one set of device slots, taken over by whichever expert
    runs; ``model.to()`` leaves the swapped blocks to the swap."""
    paths = {}
    for seed, e in enumerate(("low", "high")):
        sd, cfg = make_sd(num_layers=LAYERS, seed=seed)
        paths[e] = tmp_path / f"{e}.safetensors"
        save_safetensors(sd, paths[e], metadata={"num_heads": "2"})
    refs = {e: load_dit(p, "t2v-A14B", dtype="fp32") for e, p in paths.items()}
    models = {e: load_dit(p, "t2v-A14B", dtype="fp32") for e, p in paths.items()}
    first = BlockSwap(models["high"].blocks, 4, "cpu")
    second = BlockSwap(models["low"].blocks, 4, "cpu", share_slots_with=first)
    assert second.slots is first.slots
    x = torch.randn(1, cfg.in_channels, 2, 4, 4)
    ctx = torch.randn(1, 3, cfg.text_dim)
    with torch.no_grad():
        for e in ("high", "low", "high", "low"):
            assert torch.equal(models[e](x, torch.tensor([700.0]), ctx), refs[e](x, torch.tensor([700.0]), ctx)), e
            assert len(first.resident) + len(second.resident) <= 2 * (LAYERS - 4) and \
                not (first.slot_of and second.slot_of)
    m = models["low"]
    m.to(torch.float64)  # everything but the swapped blocks follows .to()
    assert m.patch_embedding.weight.dtype == torch.float64
    assert all(m.blocks[j].ffn[0].weight.dtype == torch.float32 for j in second.host)
    with pytest.raises(ValueError, match="same shape"):
        BlockSwap(load_dit(paths["low"], "t2v-A14B", dtype="fp32").blocks, 3, "cpu", share_slots_with=first)
