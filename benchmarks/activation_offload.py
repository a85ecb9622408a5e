"""What a bf16 stash of the offloaded checkpoints costs, measured.

``--gradient_checkpointing_cpu_offload`` keeps each block's input (the float32 residual stream) in
host memory until the backward pass recomputes the block; ``--gradient_checkpointing_cpu_offload_dtype
bf16`` keeps it in bf16 instead: half the host memory, but each block is recomputed from a rounded
input. One random-weight DiT (bf16 weights with ``load_dit``'s float32 islands, as training runs it)
with a rank-16 LoRA (``lora_up`` non-zero, so every adapter gets a gradient) takes one
flow-matching step per batch (timesteps 100..900) four ways:

* ``plain``: gradient checkpointing (``torch.utils.checkpoint``), the reference;
* ``offload``: float32 stash on the host — must equal ``plain`` bit for bit;
* ``offload_bf16``: bf16 stash;
* ``fp32_weights``: plain checkpointing with float32 weights, for scale (what bf16 itself costs).

Reported: the LoRA gradients' cosine similarity and relative error ``|g − g_ref| / |g_ref|``
(averaged over ``--batches``), and the bytes the stash holds at the end of the forward pass
(every block's stashed input, counted from the tensors themselves), fp32 against bf16.

    python benchmarks/activation_offload.py [--dim 512 --ffn_dim 1536 --heads 4 --layers 8 --grid 3 16 16]
"""

from __future__ import annotations

import argparse

import torch

from common import active_lora, add_model_args, dit_config, flow_batch, flow_loss, lora_gradient, mean_compare, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="bf16 vs float32 stash of the offloaded checkpoints")
    add_model_args(p, dim=512, ffn_dim=1536, heads=4, layers=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import wanlora.models.activation_offload as ao
    from wanlora.models.dit import WanDiT
    from wanlora.models.loading import cast_dit

    cfg = dit_config(a)
    torch.manual_seed(0)
    base = WanDiT(cfg)
    with torch.no_grad():  # weights at the scale of trained ones: unit-variance activations
        for n, q in base.named_parameters():
            if q.ndim >= 2:
                q.normal_(0, q[0].numel() ** -0.5)
            elif not n.endswith(("norm3.weight", "norm_q.weight", "norm_k.weight")):
                q.normal_(0, 0.02)
    state = base.state_dict()

    modes = {"plain": (torch.bfloat16, False, None), "offload": (torch.bfloat16, True, None),
             "offload_bf16": (torch.bfloat16, True, torch.bfloat16), "fp32_weights": (torch.float32, False, None)}
    stashed: list[torch.Tensor] = []
    real_stash = ao._stash

    def counting_stash(x, dtype):
        out = real_stash(x, dtype)
        stashed.append(out)
        return out

    ao._stash = counting_stash
    f, h, w = a.grid
    grads = {k: [] for k in modes}
    stash_bytes = {}
    for name, (dtype, offload, stash) in modes.items():
        m = WanDiT(cfg)
        m.load_state_dict(state)
        cast_dit(m, dtype).requires_grad_(False)
        net = active_lora(m)
        m.set_gradient_checkpointing(True, cpu_offload=offload, stash_dtype=stash)
        m.train()
        for b in range(a.batches):
            batch = flow_batch(b, a.batches, a.grid)
            net.zero_grad(set_to_none=True)
            stashed.clear()
            loss = flow_loss(m, batch)
            if offload:
                stash_bytes[name] = sum(s.numel() * s.element_size() for s in stashed)
            stashed.clear()
            loss.backward()
            grads[name].append(lora_gradient(net))
    ao._stash = real_stash

    tokens = f * (h // 2) * (w // 2)
    res = {"config": vars(a), "tokens": tokens, "gradients": {},
           "offload_equals_plain": all(torch.equal(x, y) for x, y in zip(grads["offload"], grads["plain"])),
           "stash_bytes": stash_bytes}
    for name, ref in (("offload_bf16", "offload"), ("plain", "fp32_weights")):
        res["gradients"][f"{name} vs {ref}"] = mean_compare(grads[name], grads[ref])
    report(res, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
