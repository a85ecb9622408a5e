"""VAE encode/decode time and peak memory per frame size (CPU, or CUDA when available).

Random weights at tiny, medium or the released sizes (``--dim``); the numbers measure compute and
memory, not quality. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the
rise of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
call; glibc's mmap threshold is pinned so freed activations leave RSS at once).

Examples::

    python benchmarks/vae.py --kind wan2.1 --dim tiny --sizes 64x64,128x128 --frames 17
    python benchmarks/vae.py --kind both --dim real --sizes 480x832,720x1280 --frames 81 \\
        --device cuda --dtype bfloat16 --tile 256
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from wanlora.models.vae import WanVAE, build_vae

DIMS = {  # --dim preset -> build_vae kwargs per kind
    "tiny": {"wan2.1": dict(dim=8), "wan2.2": dict(dim=8, dec_dim=12)},
    "medium": {"wan2.1": dict(dim=32), "wan2.2": dict(dim=48, dec_dim=80)},
    "real": {"wan2.1": dict(), "wan2.2": dict()},
}


def _mmap_threshold(nbytes: int) -> None:
    """glibc ``M_MMAP_THRESHOLD`` (-3): blocks above it are mmapped and returned to the OS on free.
    A low value makes RSS follow the live tensors (memory pass) but costs page faults (time pass)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except OSError:
        pass


def _cpu_peak_reset() -> int:
    try:  # hand freed heap back first, so the next peak is this call's own
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS:")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes above the level before the call) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, torch.cuda.max_memory_allocated() - base
    base = _cpu_peak_reset()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, _status("VmHWM:") - base


def _time_and_peak(fn, device: torch.device, repeats: int) -> tuple[str, str]:
    """Best time of ``repeats`` runs (heap reuse on) and the peak of one run (RSS following live
    tensors on CPU), formatted."""
    _mmap_threshold(32 * 2**20)
    secs = min(measure(fn, device)[0] for _ in range(repeats))
    if device.type == "cpu":
        _mmap_threshold(128 * 1024)
    peak = measure(fn, device)[1]
    return f"{secs:.3f}", f"{peak / 2**20:.0f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="both", choices=["wan2.1", "wan2.2", "both"])
    p.add_argument("--dim", default="tiny", choices=sorted(DIMS), help="model width preset")
    p.add_argument("--sizes", default="64x64,128x128", help="comma-separated HxW in pixels")
    p.add_argument("--frames", type=int, default=17, help="pixel frames (4n+1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tile", type=int, default=None, help="decode tile size in pixels (default: untiled)")
    p.add_argument("--decode-only", action="store_true", help="skip encode (decode random latents)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    kinds = ["wan2.1", "wan2.2"] if a.kind == "both" else [a.kind]
    print(f"device={device} dtype={a.dtype} dim={a.dim} frames={a.frames} tile={a.tile} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| kind | size HxW | frames | encode s | encode peak MiB | decode s | decode peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        vae = WanVAE(build_vae(kind, **DIMS[a.dim][kind]), tiling=a.tile).to(device, dtype)
        warm = torch.zeros(1, 3, 1, vae.stride[1] * 2, vae.stride[2] * 2, device=device)
        vae.decode(vae.encode(warm))
        for size in a.sizes.split(","):
            h, w = (int(v) for v in size.lower().split("x"))
            t_lat = 1 + (a.frames - 1) // 4
            z = torch.randn(1, vae.z_dim, t_lat, h // vae.stride[1], w // vae.stride[2], device=device)
            enc = ("-", "-")
            if not a.decode_only:
                x = torch.rand(1, 3, a.frames, h, w, device=device, dtype=dtype) * 2 - 1
                enc = _time_and_peak(lambda: vae.encode(x), device, a.repeats)
                del x
            dec = _time_and_peak(lambda: vae.decode(z), device, a.repeats)
            print(f"| {kind} | {h}x{w} | {a.frames} | {enc[0]} | {enc[1]} | {dec[0]} | {dec[1]} |", flush=True)


if __name__ == "__main__":
    main()
