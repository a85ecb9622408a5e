"""Per-rank peak memory of one LoRA training step: 1 process against 2 (Ulysses, FSDP2, both).

Every run trains the same LoRA (``networks.lora_wan``, rank 16) on the same random-weight DiT and
one sample of ``--frames × --height × --width`` tokens (after patching), forward + backward, with
gradient checkpointing as given. Layouts:

* ``1`` — one process;
* ``sp2`` — 2 processes, ``--ulysses_size 2`` (each holds half of the tokens);
* ``fsdp2`` — 2 processes, the frozen DiT sharded with FSDP2 (each holds half of the weights);
* ``sp2+fsdp2`` — both.

Each layout runs in fresh processes (gloo on the CPU, NCCL with ``--device cuda``). Per rank it
reports the weights it holds (bytes of its local parameter shards) and the step's peak memory above
the memory held before the step (CUDA: ``max_memory_allocated``; CPU: peak RSS growth, which
includes allocator slack). Results are printed as a Markdown table (``--json`` writes them too).

    python benchmarks/distributed_memory.py                                   # CPU, ~20k tokens
    python benchmarks/distributed_memory.py --device cuda --dim 5120 --ffn 13824 --heads 40 --layers 4 \\
        --frames 21 --height 30 --width 52 --dtype bf16     # 2 GPUs: A14B width, 720p-like tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = {"1": (1, 1, False), "sp2": (2, 2, False), "fsdp2": (2, 1, True), "sp2+fsdp2": (2, 2, True)}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(rank, world, port, a, ulysses, fsdp, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    cuda = a.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.models.distributed import distribute_dit, parallel_layout
    from wanlora.networks.lora_wan import create_network

    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    layout = parallel_layout(ulysses, fsdp, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=a.dim, ffn_dim=a.ffn, num_heads=a.heads, num_layers=a.layers, in_channels=16,
                       out_channels=16, text_dim=a.text_dim)
    with torch.device("cpu" if fsdp else device):
        dit = WanDiT(cfg).to(dtype)
    dit.requires_grad_(False)
    dit.set_gradient_checkpointing(a.checkpointing)
    net = create_network(1.0, 16, 16, None, None, dit)
    net.apply_to(None, dit)
    net.to(device)
    if world > 1:
        distribute_dit(dit, layout)
    weights = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                  for p in dit.parameters()) / 2**20
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, a.frames, 2 * a.height, 2 * a.width, generator=g).to(device)
    ctx = [torch.randn(64, a.text_dim, generator=g).to(device)]
    t = torch.tensor([500.0], device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _current_rss_mib()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = dit(x, t, ctx)
    (out.float() ** 2).mean().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = _rss_mib() - before
    queue.put({"rank": rank, "weights_mib": round(weights, 1), "step_peak_mib": round(peak, 1)})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a, layout: str) -> list[dict]:
    world, ulysses, fsdp = LAYOUTS[layout]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(world, _free_port(), a, ulysses, fsdp, queue), nprocs=world, join=True,
                       start_method="spawn")
    return sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--text_dim", type=int, default=64)
    p.add_argument("--frames", type=int, default=21, help="latent frames")
    p.add_argument("--height", type=int, default=30, help="tokens per column (latent height / 2)")
    p.add_argument("--width", type=int, default=32, help="tokens per row (latent width / 2)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tokens = a.frames * a.height * a.width
    rows = []
    for layout in a.layouts:
        for r in run(a, layout):
            rows.append({"layout": layout, "tokens": tokens, **r})
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"device {a.device}; DiT {a.dim}/{a.ffn}/{a.heads}/{a.layers} {a.dtype}, {tokens} tokens, "
          f"checkpointing {'on' if a.checkpointing else 'off'}")
    print("| layout | rank | weights held MiB | step peak MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['rank']} | {r['weights_mib']} | {r['step_peak_mib']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
