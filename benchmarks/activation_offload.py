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
import json
from pathlib import Path

import torch


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "rel_error": float((a - b).norm() / b.norm())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="bf16 vs float32 stash of the offloaded checkpoints")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn_dim", type=int, default=1536)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--grid", type=int, nargs=3, default=(3, 16, 16), help="latent frames, height, width")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import wanlora.models.activation_offload as ao
    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.models.loading import cast_dit
    from wanlora.networks.lora_wan import create_network

    cfg = WanDiTConfig(dim=a.dim, ffn_dim=a.ffn_dim, num_heads=a.heads, num_layers=a.layers,
                       in_channels=16, out_channels=16)
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
        torch.manual_seed(1)
        net = create_network(1.0, 16, 16, None, None, m)
        net.apply_to(None, m)
        gg = torch.Generator().manual_seed(2)
        for n, q in net.named_parameters():
            if "lora_up" in n:
                q.data = torch.randn(q.shape, generator=gg) * 0.01
        net.requires_grad_(True)
        m.set_gradient_checkpointing(True, cpu_offload=offload, stash_dtype=stash)
        m.train()
        for b in range(a.batches):
            gb = torch.Generator().manual_seed(100 + b)
            x0 = torch.randn(1, 16, f, h, w, generator=gb)
            noise = torch.randn(1, 16, f, h, w, generator=gb)
            ctx = [torch.randn(40, 4096, generator=gb) * 0.5]
            t = torch.tensor([100.0 + 800.0 * b / max(1, a.batches - 1)])
            sigma = t / 1000.0
            x_t = (1 - sigma) * x0 + sigma * noise
            net.zero_grad(set_to_none=True)
            stashed.clear()
            loss = torch.nn.functional.mse_loss(m(x_t, t, ctx).float(), noise - x0)
            if offload:
                stash_bytes[name] = sum(s.numel() * s.element_size() for s in stashed)
            stashed.clear()
            loss.backward()
            grads[name].append(torch.cat([q.grad.reshape(-1).float() for q in net.parameters()]))
    ao._stash = real_stash

    tokens = f * (h // 2) * (w // 2)
    res = {"config": vars(a), "tokens": tokens, "gradients": {},
           "offload_equals_plain": all(torch.equal(x, y) for x, y in zip(grads["offload"], grads["plain"])),
           "stash_bytes": stash_bytes}
    for name, ref in (("offload_bf16", "offload"), ("plain", "fp32_weights")):
        per = [_stats(x, y) for x, y in zip(grads[name], grads[ref])]
        res["gradients"][f"{name} vs {ref}"] = {k: sum(d[k] for d in per) / len(per) for k in per[0]}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
