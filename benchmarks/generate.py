"""Denoising-step time and peak memory of the generation loop: CFG batched (one forward of batch 2)
against two separate forwards.

Random-weight DiTs at a preset size (``--dim``); the numbers measure compute and memory, not
quality. One "step" is what :meth:`wanlora.inference.pipeline.WanPipeline.denoise` does per timestep: the
guided velocity (:func:`wanlora.inference.sampling.guided_velocity`) and one UniPC update. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` before each mode) minus the RSS before the mode.

Examples::

    python benchmarks/generate.py --dim tiny --size 64x64 --frames 17 --steps 4
    python benchmarks/generate.py --dim 1.3B --size 480x832 --frames 81 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.loading import cast_dit
from wanlora.inference.sampling import UniPCSolver, guided_velocity, make_schedule

PRESETS = {  # dim, ffn_dim, heads, layers, text_dim
    "tiny": (64, 128, 2, 2, 32),
    "small": (256, 1024, 2, 4, 256),
    "medium": (1024, 4096, 8, 8, 4096),
    "1.3B": (1536, 8960, 12, 30, 4096),
    "5B": (3072, 14336, 24, 30, 4096),
    "14B": (5120, 13824, 40, 40, 4096),
}


def _pin_malloc() -> None:
    """Large blocks mmapped and returned to the OS on free, so RSS peaks compare across modes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_kib("VmRSS:") * 1024


def _peak(device, base: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss_kib("VmHWM:") * 1024 - base


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", default="tiny", choices=list(PRESETS))
    p.add_argument("--size", default="64x64", help="HxW in pixels (VAE stride 8)")
    p.add_argument("--frames", type=int, default=17, help="pixel frames, 4n+1")
    p.add_argument("--in_channels", type=int, default=16, help="16 (T2V) / 48 (TI2V, stride 16)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode (after 1 warm-up)")
    p.add_argument("--text_rows", type=int, default=60, help="prompt length in tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn_mode", default="sdpa")
    p.add_argument("--modes", default="batched,separate")
    a = p.parse_args(argv)

    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if device.type == "cpu":
        _pin_malloc()
    dim, ffn, heads, layers, text_dim = PRESETS[a.dim]
    cfg = WanDiTConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, in_channels=a.in_channels,
                       out_channels=a.in_channels, text_dim=text_dim)
    with torch.device(device):
        dit = WanDiT(cfg, attn_mode=a.attn_mode)
    cast_dit(dit, dtype).eval().requires_grad_(False)  # load_dit's precision: fp32 islands kept
    H, W = (int(v) for v in a.size.lower().split("x"))
    stride = 16 if a.in_channels == 48 else 8
    T = (a.frames - 1) // 4 + 1
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, a.in_channels, T, H // stride, W // stride, generator=g, device=device)
    ctx = [torch.randn(a.text_rows, text_dim, generator=g, device=device)]
    null = [torch.randn(a.text_rows + 40, text_dim, generator=g, device=device)]
    tokens = T * (H // stride // 2) * (W // stride // 2)
    print(f"device={device} dtype={a.dtype} dit={a.dim} (dim {dim}, {layers} layers) size={H}x{W} "
          f"frames={a.frames} tokens={tokens} threads={torch.get_num_threads()}")
    print("| mode | s/step | peak memory (MiB) |")
    print("|---|---|---|")
    for mode in a.modes.split(","):
        if device.type == "cpu":
            import gc

            gc.collect()
        sched = make_schedule(a.steps + 1, 5.0)
        solver = UniPCSolver(sched)
        x = x0.clone()
        base = _reset_peak(device)
        times = []
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                v = guided_velocity(dit, x, t.view(1).to(device), ctx, null, 5.0, batched=mode == "batched")
                x = solver.step(v, x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i > 0:
                    times.append(time.perf_counter() - t0)
        peak = _peak(device, base) / 2**20
        print(f"| {mode} | {sum(times) / len(times):.4f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
