"""Speed and peak memory of the Wan DiT forward (and forward + backward) at a chosen size.

Random weights, random inputs; sizes in latent units (the token count is F·H·W/4 for the (1,2,2)
patch). The backward pass is the LoRA-training one: base weights frozen, gradients flow to the
input (through every block), nothing is accumulated in the weights.

Prints one markdown table row (add ``--header`` for the header), e.g.::

    python benchmarks/dit_forward.py --dim 1536 --ffn_dim 8960 --heads 12 --layers 2 \\
        --frames 3 --height 16 --width 16 --dtype float32 --device cpu --backward --repeat 3

Peak memory is measured on the first (cold) call of each phase, above the usage before it (so
weights are not counted; they are listed apart): CUDA ``torch.cuda.max_memory_allocated``
(reset before each phase); CPU the process's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` where the kernel allows it). Times are the best of ``--repeat`` warm calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.loading import cast_dit


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counter; return the current usage in MB (the phase's baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _rss_mb("VmRSS")


def _peak(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    return _rss_mb("VmHWM") - base


def _timed(fn, device, repeat):
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--ffn_dim", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--in_channels", type=int, default=16)
    p.add_argument("--text_dim", type=int, default=4096)
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=16, help="latent width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn_mode", default="sdpa")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--header", action="store_true")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg = WanDiTConfig(dim=a.dim, ffn_dim=a.ffn_dim, num_heads=a.heads, num_layers=a.layers,
                       in_channels=a.in_channels, out_channels=16, text_dim=a.text_dim)
    with torch.device(device):
        model = WanDiT(cfg, attn_mode=a.attn_mode)
    cast_dit(model, dtype)  # the dtype policy of load_dit: fp32 islands
    model.requires_grad_(False)
    model.set_gradient_checkpointing(a.gradient_checkpointing)

    x = torch.randn(a.batch, a.in_channels, a.frames, a.height, a.width, device=device)
    t = torch.full((a.batch,), 500.0, device=device)
    ctx = torch.randn(a.batch, 512, a.text_dim, device=device)
    tokens = a.frames * (a.height // 2) * (a.width // 2)

    def fwd():
        with torch.no_grad():
            model(x, t, ctx)

    def fwd_bwd():
        xi = x.detach().requires_grad_(True)
        model(xi, t, ctx).float().square().mean().backward()

    weights_mb = sum(q.numel() * q.element_size() for q in model.parameters()) / 2**20
    base = _reset_peak(device)  # cold first call: memory peaks are measured on it
    fwd()
    fwd_mb = _peak(device, base)
    fwd_ms = _timed(fwd, device, a.repeat)
    row = [f"{fwd_ms:.1f}", f"{fwd_mb:.0f}"]
    if a.backward:
        base = _reset_peak(device)
        fwd_bwd()
        bwd_mb = _peak(device, base)
        bwd_ms = _timed(fwd_bwd, device, a.repeat)
        row += [f"{bwd_ms:.1f}", f"{bwd_mb:.0f}"]
    else:
        row += ["—", "—"]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    if a.header:
        print("| device | threads | dtype | dim/ffn/heads/layers | B×F×H×W (tokens) | ckpt | weights MB "
              "| fwd ms | fwd peak MB | fwd+bwd ms | fwd+bwd peak MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    ckpt = "yes" if a.gradient_checkpointing else "no"
    print(f"| {where} | {threads} | {a.dtype} | {a.dim}/{a.ffn_dim}/{a.heads}/{a.layers} | "
          f"{a.batch}×{a.frames}×{a.height}×{a.width} ({tokens}) | {ckpt} | {weights_mb:.0f} | "
          + " | ".join(row) + " |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
