"""A Wan2.2 A14B expert at its real size, trained on the CPU with fp8 base weights.

1. ``write``: a random-weight T2V-A14B expert (dim 5120, 40 blocks, 14.3 B parameters) in the
   official six-shard layout (``diffusion_pytorch_model-0000k-of-00006.safetensors`` + index +
   ``config.json``), bf16, 28.6 GB, into ``--folder`` (outside the repository). Streamed: one
   tensor is generated and written at a time (:class:`~wanlora.models.safetensors_stream.SafetensorsStreamWriter`),
   so writing needs no more memory than the largest tensor. Skipped when the folder already holds it.
2. ``train``: ``load_dit(..., fp8="base")`` (``--fp8_base``) streams the shards tensor by tensor,
   then a LoRA (rank ``--rank``) trains ``--steps`` AdamW steps with gradient checkpointing on a
   small latent (``--grid``; flow-matching loss as the trainer's). Records the load time, the peak
   RSS while loading, each step's time and the run's peak RSS (``VmHWM``), next to the fp8 model's
   size and the memory model's prediction for the same settings.

    python benchmarks/real_size.py --folder /data/wan_a14b_random            # write once, then train
    python benchmarks/real_size.py --folder DIR --min_available_gb 19 --json out.json

Memory safety: the training phase refuses to start unless ``MemAvailable`` is at least
``--min_available_gb`` (the fp8 model is 14.9 GB; a bf16 expert, 28.9 GB, cannot fit a 24 GB host).
The same functions run on a small model in ``tests/test_real_size.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

SHARDS = 6


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_bytes() -> int:
    """Current resident set size (bytes)."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (``VmHWM``, bytes)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs``, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def available_bytes() -> int:
    """``MemAvailable`` of the host (bytes)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024


def expert_config(task: str = "t2v-A14B", **over):
    """The task's official DiT architecture (``over`` replaces fields, for small test models)."""
    from wanlora.models.dit import WanDiTConfig
    from wanlora.tasks import get_task

    t = get_task(task)
    fields = dict(dim=t.dim, ffn_dim=t.ffn_dim, num_heads=t.num_heads, num_layers=t.num_layers,
                  in_channels=t.in_channels, out_channels=t.out_channels, text_dim=t.text_dim,
                  freq_dim=t.freq_dim, patch_size=t.patch_size)
    fields.update(over)
    return WanDiTConfig(**fields)


def write_expert(folder: str | os.PathLike, config, seed: int = 0, dtype=torch.bfloat16, shards: int = SHARDS,
                 pool: int = 1 << 24) -> dict:
    """Write a random-weight DiT in the official sharded layout, one tensor in memory at a time.

    Weights: uniform with standard deviation ``1/sqrt(fan_in)`` for matrices and 0.02 for vectors,
    ones for norm weights (activations stay in range through 40 blocks). Drawing 14 B random numbers
    would take an hour on two shared cores, so each distinct standard deviation gets one pool of
    ``pool`` random values and every tensor is a window of its pool at a random offset (wrapping):
    random-looking, different per tensor, and written at disk speed. Returns ``{"bytes",
    "seconds", "written"}``;
    does nothing but report when the index already exists.
    """
    from wanlora.io_utils import write_json
    from wanlora.models.dit import WanDiT
    from wanlora.models.safetensors_stream import SafetensorsStreamWriter

    folder = Path(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(config).state_dict().items()}
    nbytes = {k: math.prod(s) * torch.empty((), dtype=dtype).element_size() for k, s in shapes.items()}
    total = sum(nbytes.values())
    if index.exists():
        return {"bytes": total, "seconds": 0.0, "written": False}
    folder.mkdir(parents=True, exist_ok=True)
    # split in model order into shards of about equal size
    groups, cur, acc = [[] for _ in range(shards)], 0, 0
    for k in shapes:
        if acc >= (cur + 1) * total / shards and cur < shards - 1:
            cur += 1
        groups[cur].append(k)
        acc += nbytes[k]
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    pools: dict[float, torch.Tensor] = {}

    def draw(shape) -> torch.Tensor:
        n = math.prod(shape)
        std = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
        if std not in pools:
            bound = std * math.sqrt(3.0)
            pools[std] = torch.empty(pool).uniform_(-bound, bound, generator=g).to(dtype)
        src = pools[std]
        start = int(torch.randint(pool, (), generator=g))
        if n <= pool - start:
            return src[start:start + n].reshape(shape)
        rolled = torch.cat([src[start:], src[:start]])
        return rolled.repeat(-(-n // pool))[:n].reshape(shape)

    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        specs = {k: (dtype, shapes[k]) for k in keys}
        with SafetensorsStreamWriter(folder / name, specs, metadata={"format": "pt"}) as w:
            for k in keys:
                s = shapes[k]
                if k.endswith(("norm3.weight", "norm_q.weight", "norm_k.weight")):
                    t = torch.ones(s, dtype=dtype)
                else:
                    t = draw(s)
                w.write(k, t)
                del t
        weight_map.update({k: name for k in keys})
        print(f"  wrote {name} ({sum(nbytes[k] for k in keys) / 1e9:.2f} GB)", flush=True)
    write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(folder / "config.json", {"dim": config.dim, "num_heads": config.num_heads,
                                        "num_layers": config.num_layers, "ffn_dim": config.ffn_dim})
    return {"bytes": total, "seconds": time.perf_counter() - t0, "written": True}


def train_steps(folder, task: str = "t2v-A14B", steps: int = 3, grid=(1, 8, 8), rank: int = 32,
                fp8: str | None = "base", dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Load with ``fp8`` and train a LoRA ``steps`` steps on the CPU with gradient checkpointing.

    Args:
        grid: latent ``(frames, height, width)``; tokens = frames·height·width/4.

    Returns:
        ``{"load_seconds", "load_peak_rss", "model_bytes", "step_seconds": [...], "losses": [...],
        "peak_rss", "tokens", "lora_changed"}`` (bytes, seconds).
    """
    from wanlora.models import load_dit
    from wanlora.networks.lora_wan import create_network

    torch.manual_seed(seed)
    reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    dit = load_dit(folder, task, dtype=dtype, device="cpu", fp8=fp8)
    load_seconds = time.perf_counter() - t0
    load_peak = peak_rss_bytes() - base
    model_bytes = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    net = create_network(1.0, rank, rank, None, None, dit)
    net.apply_to(None, dit)
    net.requires_grad_(True)
    dit.set_gradient_checkpointing(True)
    dit.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    cfg = dit.config
    f, h, w = grid
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(1, cfg.out_channels, f, h, w, generator=g)
    ctx = [torch.randn(64, cfg.text_dim, generator=g) * 0.1]
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        sigma = torch.rand(1, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = (1 - sigma) * x0 + sigma * noise  # flow matching: x_t, target noise - x0
        v = dit(x_t, sigma * 1000.0, ctx)
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"  step {len(times)}: {times[-1]:.1f} s, loss {losses[-1]:.4f}, RSS {rss_bytes() / 1e9:.2f} GB",
              flush=True)
    changed = any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    return {"load_seconds": load_seconds, "load_peak_rss": load_peak, "model_bytes": model_bytes,
            "step_seconds": times, "losses": losses, "peak_rss": peak_rss_bytes(), "baseline_rss": base,
            "tokens": f * (h // 2) * (w // 2), "lora_changed": changed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a real-size random A14B expert and train it on the CPU in fp8")
    p.add_argument("--folder", required=True, help="where the shards go (outside the repository; 28.6 GB)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grid", type=int, nargs=3, default=(1, 8, 8), metavar=("F", "H", "W"),
                   help="latent frames, height, width (tokens = F·H·W/4)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (rank 32 adds 2.3 GB of LoRA + AdamW state)")
    p.add_argument("--fp8", choices=["base", "scaled"], default="base")
    p.add_argument("--min_available_gb", type=float, default=19.0,
                   help="refuse to train unless the host has this much available memory")
    p.add_argument("--write_only", action="store_true")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    from wanlora.training.memory import MemorySettings, estimate_memory

    cfg = expert_config()
    print(f"writing {a.folder} ...", flush=True)
    wrote = write_expert(a.folder, cfg)
    print(f"shards: {wrote['bytes'] / 1e9:.2f} GB, {wrote['seconds']:.0f} s", flush=True)
    if a.write_only:
        return 0
    avail = available_bytes()
    if avail < a.min_available_gb * 1e9:
        print(f"refusing to train: {avail / 1e9:.1f} GB available < {a.min_available_gb} GB")
        return 3
    threads = torch.get_num_threads()
    res = train_steps(a.folder, steps=a.steps, grid=tuple(a.grid), rank=a.rank, fp8=a.fp8)
    f, h, w = a.grid
    pred = estimate_memory(MemorySettings("t2v-A14B", width=w * 8, height=h * 8, frames=4 * (f - 1) + 1,
                                          rank=a.rank, fp8=a.fp8, device="cpu"))
    res.update({"shard_bytes": wrote["bytes"], "write_seconds": wrote["seconds"], "threads": threads,
                "available_before": avail, "predicted_host_peak": pred.host_total})
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
