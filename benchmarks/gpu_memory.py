"""GPU measurements of the memory path, as one script (about 3–6 minutes on one H100/H200).

1. One Wan A14B block (D=5120, FFN 13824, 40 heads, random weights, LoRA rank 32 on its ten
   Linears) forward + backward, bf16 weights vs fp8 (``--fp8_base``) vs fp8 scaled, at the token
   counts of 832x480x81 (32,760 tokens) and 1280x720x81 (75,600 tokens): time (median of 3 after a
   warm-up) and peak allocated memory (``torch.cuda.max_memory_allocated``), next to the memory
   model's prediction for one block (:func:`wanlora.training.memory.block_activation_bytes`).
2. Block-swap overlap: a stack of 8 A14B blocks (fp8) with gradient checkpointing, one training
   step at 832x480x81 with 0, 2, 4 and 6 blocks swapped: step time and peak memory. Equal times
   mean the copies hide behind the compute.
3. Checkpoints in host memory (``--gradient_checkpointing_cpu_offload``) on the same stack: step
   time and peak, with the host copies in float32 and in bf16
   (``--gradient_checkpointing_cpu_offload_dtype bf16``: half the bytes over PCIe).

    python benchmarks/gpu_memory.py --out results.json            # the real measurement
    python benchmarks/gpu_memory.py --device cpu --smoke          # a seconds-long run of the code path

Prints one line per measurement and writes them all to ``--out`` (JSON) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

A14B = dict(dim=5120, ffn_dim=13824, num_heads=40)
SIZES = {"832x480x81": (21, 30, 52), "1280x720x81": (21, 45, 80)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def build(num_layers: int, precision: str, device, dims=A14B, rank: int = 32):
    """A random-weight DiT of ``num_layers`` real-width blocks with a LoRA, on ``device``."""
    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.models.fp8 import quantize_linears_
    from wanlora.networks.lora_wan import create_network

    cfg = WanDiTConfig(**dims, num_layers=num_layers, in_channels=16, out_channels=16)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(cfg)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and name.startswith("blocks."):
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    for name, t in list(model.state_dict().items()):
        keep32 = name.startswith(("time_", "head.")) or name.endswith("modulation") or ".norm" in name
        if not keep32:
            model.get_parameter(name).data = t.to(torch.bfloat16)
    if precision != "bf16":
        quantize_linears_(model, scaled=precision == "fp8_scaled", compute_dtype=torch.bfloat16)
    model.requires_grad_(False)
    net = create_network(1.0, rank, rank, None, None, model)
    net.apply_to(None, model)
    net.to(device)
    net.requires_grad_(True)
    for n, p in net.named_parameters():
        if "lora_up" in n:
            torch.nn.init.normal_(p, std=1e-3)
    return model, net


def _inputs(grid, device, dim, batch=1):
    f, h, w = grid
    tokens = f * h * w
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, dim, generator=g).to(device)
    e0 = (torch.randn(batch, 1, 6, dim, generator=g) * 0.1).to(device)
    ctx = torch.randn(batch, 512, dim, generator=g).to(device, torch.bfloat16)
    return x, e0, ctx


def block_fwd_bwd(precision: str, size: str, device, dims, repeats: int) -> dict:
    """Time and peak of one block's forward + backward."""
    from wanlora.models.dit import rope_tables

    model, net = build(1, precision, device, dims)
    block = model.blocks[0]
    grid = SIZES[size]
    rope = rope_tables(grid, dims["dim"] // dims["num_heads"], device)
    x, e0, ctx = _inputs(grid, device, dims["dim"])
    times = []
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for i in range(repeats + 1):
        _reset_peak(device)
        xi = x.clone().requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        out = block(xi, e0, ctx, rope, torch.bfloat16, "sdpa")
        out.float().square().mean().backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        del out, xi
    peak = _peak(device)
    del model, net
    return {"precision": precision, "size": size, "tokens": grid[0] * grid[1] * grid[2],
            "seconds": statistics.median(times), "peak_bytes": peak, "weights_and_inputs_bytes": weights}


def stack_step(swap: int, offload: bool, device, dims, layers: int, size: str, repeats: int,
               stash_dtype: torch.dtype | None = None) -> dict:
    """One training step of a ``layers``-block fp8 stack with ``swap`` blocks swapped (checkpoints
    offloaded with ``offload``, kept in ``stash_dtype``)."""
    from wanlora.models.block_swap import BlockSwap

    model, net = build(layers, "fp8", device, dims)
    model.set_gradient_checkpointing(True, cpu_offload=offload, stash_dtype=stash_dtype)
    model.train()
    bs = BlockSwap(model.blocks, swap, device) if swap else None
    f, h, w = SIZES[size]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g).to(device)
    ctx = torch.randn(1, 64, 4096, generator=g).to(device)
    t = torch.tensor([500.0], device=device)
    times = []
    for i in range(repeats + 1):
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        model(x, t, ctx).square().mean().backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        net.zero_grad(set_to_none=True)
    peak = _peak(device)
    out = {"layers": layers, "blocks_to_swap": swap, "cpu_offload": offload,
           "stash_dtype": str(stash_dtype or torch.float32).removeprefix("torch."), "size": size,
           "seconds": statistics.median(times), "peak_bytes": peak,
           "copies": bs.copies if bs else 0}
    if bs:
        bs.remove()
    del model, net, bs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="GPU memory/time of fp8, block swap and checkpoint offload")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_memory.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the code path, measures nothing)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dims, layers, repeats = A14B, 8, args.repeats
    if args.smoke:
        dims, layers, repeats = dict(dim=256, ffn_dim=512, num_heads=2), 4, 1
        SIZES.update({k: (2, 2, 4) for k in SIZES})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    res = {"device": name, "torch": torch.__version__, "block": [], "swap": []}
    from wanlora.training.memory import block_activation_bytes

    for size in SIZES:
        for precision in ("bf16", "fp8", "fp8_scaled"):
            try:
                r = block_fwd_bwd(precision, size, device, dims, repeats)
            except torch.cuda.OutOfMemoryError as e:
                r = {"precision": precision, "size": size, "error": f"out of memory: {e}"[:200]}
            else:
                if not args.smoke:
                    r["predicted_activation_bytes"] = block_activation_bytes("t2v-A14B", "train", r["tokens"])
            res["block"].append(r)
            print(json.dumps(r), flush=True)
    for swap, offload, stash in ((0, False, None), (2, False, None), (4, False, None), (6, False, None),
                                 (0, True, None), (4, True, None), (4, True, torch.bfloat16)):
        swap = min(swap, layers - 2)
        try:
            r = stack_step(swap, offload, device, dims, layers, "832x480x81", repeats, stash)
        except torch.cuda.OutOfMemoryError as e:
            r = {"blocks_to_swap": swap, "cpu_offload": offload, "error": f"out of memory: {e}"[:200]}
        res["swap"].append(r)
        print(json.dumps(r), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
