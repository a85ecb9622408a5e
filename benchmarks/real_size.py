"""A Wan2.2 A14B expert at its real size, trained on the CPU with fp8 base weights.

The expert: random weights (:class:`WindowedRandom`) in the T2V-A14B architecture (dim 5120, 40
blocks, 14.3 B parameters), either

* built in memory (default, :func:`build_expert`): one block at a time materialized in bf16 and
  quantized as ``load_dit(..., fp8="base")`` would — the host never holds more than the fp8 model
  and one bf16 block; about 5 minutes on this machine instead of half an hour of disk; or
* ``--folder DIR``: written once in the official six-shard bf16 layout (28.6 GB, streamed one
  tensor at a time, :func:`write_expert`; skipped when the folder holds it) and loaded from there
  with ``load_dit`` (the loader's streaming and its peak memory are what is measured then).

Both give the same weights bit for bit (``tests/test_real_size.py``). Then ``--steps`` LoRA
training steps (forward, flow-matching loss, backward into the LoRA, AdamW step) with gradient
checkpointing on a small latent (``--grid``), optionally with ``--blocks_to_swap N`` (the CPU's
host→host schedule) and the checkpoints offloaded (``--offload_activations``, ``--stash_dtype``).
Records the build/load time and peak RSS, each step's time, loss and whether the LoRA gradients
are finite, and the run's peak RSS (``VmHWM``), next to the fp8 model's size and the memory
model's prediction.

    python benchmarks/real_size.py --steps 2 --blocks_to_swap 39 --offload_activations --json out.json
    python benchmarks/real_size.py --folder /data/wan_a14b_random --write_only    # shards only

Memory safety: training refuses to start unless ``MemAvailable`` is at least ``--min_available_gb``
(the fp8 model is 14.9 GB; a bf16 expert, 28.9 GB, cannot fit a 24 GB host). The same functions run
on a small model in ``tests/test_real_size.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import zlib
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


class WindowedRandom:
    """Random-looking weights at disk or memory speed, reproducible from ``seed``.

    Drawing 14 B random numbers would take an hour on two shared cores, so each distinct standard
    deviation gets one pool of ``pool`` uniform values (std ``1/sqrt(fan_in)`` for matrices, 0.02
    for vectors; activations stay in range through 40 blocks) and every tensor is a window of its
    pool at an offset drawn from its name (wrapping): different per tensor, as fast as a copy, and
    independent of the order tensors are asked for (so the shards and the in-memory build hold the
    same weights). Norm weights (``norm3``, ``norm_q``, ``norm_k``) are ones.
    """

    def __init__(self, seed: int = 0, dtype=torch.bfloat16, pool: int = 1 << 24):
        self.seed, self.dtype, self.pool = seed, dtype, pool
        self.pools: dict[float, torch.Tensor] = {}

    def _generator(self, what: str) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{what}".encode()))

    def __call__(self, key: str, shape) -> torch.Tensor:
        """A new ``shape`` tensor in ``dtype`` for the parameter ``key``."""
        shape = tuple(shape)
        if key.endswith(("norm3.weight", "norm_q.weight", "norm_k.weight")):
            return torch.ones(shape, dtype=self.dtype)
        n, pool = math.prod(shape), self.pool
        std = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
        if std not in self.pools:
            bound = std * math.sqrt(3.0)
            self.pools[std] = torch.empty(pool).uniform_(-bound, bound, generator=self._generator(repr(std))
                                                         ).to(self.dtype)
        src = self.pools[std]
        start = int(torch.randint(pool, (), generator=self._generator(key)))
        if n <= pool - start:
            return src[start:start + n].reshape(shape).clone()
        rolled = torch.cat([src[start:], src[:start]])
        return rolled.repeat(-(-n // pool))[:n].reshape(shape)


def write_expert(folder: str | os.PathLike, config, seed: int = 0, dtype=torch.bfloat16, shards: int = SHARDS,
                 pool: int = 1 << 24) -> dict:
    """Write a random-weight DiT (:class:`WindowedRandom`) in the official sharded layout, one
    tensor in memory at a time. Returns ``{"bytes", "seconds", "written"}``; does nothing but
    report when the index already exists.
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
    draw = WindowedRandom(seed, dtype, pool)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        specs = {k: (dtype, shapes[k]) for k in keys}
        with SafetensorsStreamWriter(folder / name, specs, metadata={"format": "pt"}) as w:
            for k in keys:
                t = draw(k, shapes[k])
                w.write(k, t)
                del t
        weight_map.update({k: name for k in keys})
        print(f"  wrote {name} ({sum(nbytes[k] for k in keys) / 1e9:.2f} GB)", flush=True)
    write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(folder / "config.json", {"dim": config.dim, "num_heads": config.num_heads,
                                        "num_layers": config.num_layers, "ffn_dim": config.ffn_dim})
    return {"bytes": total, "seconds": time.perf_counter() - t0, "written": True}


@torch.no_grad()
def build_expert(config, fp8: str | None = "base", dtype=torch.bfloat16, seed: int = 0, pool: int = 1 << 24):
    """The random DiT of :func:`write_expert` built in memory, as ``load_dit(..., fp8=fp8)`` would
    give it from the shards, without the disk.

    The model is created on the ``meta`` device; then the parts outside the blocks and one block
    at a time are materialized in bf16 (the shards' dtype), cast as
    :func:`~wanlora.models.loading.load_dit` casts (float32 islands, the rest in ``dtype``) and
    the block's Linear layers quantized (:func:`~wanlora.models.fp8.quantize_linears_`, the same
    :func:`~wanlora.models.fp8.quantize_weight` the loader applies). The host holds the fp8 model
    plus one bf16 block at most (0.7 GB for A14B).

    Args:
        config: :class:`~wanlora.models.dit.WanDiTConfig`.
        fp8: ``"base"``, ``"scaled"`` or ``None`` (everything in ``dtype``: 28.9 GB for A14B).
        dtype: the compute dtype.

    Returns:
        The frozen :class:`~wanlora.models.dit.WanDiT` on the CPU in eval mode.
    """
    from wanlora.models.dit import WanDiT
    from wanlora.models.fp8 import quantize_linears_
    from wanlora.models.loading import keeps_float32

    draw = WindowedRandom(seed, torch.bfloat16, pool)
    with torch.device("meta"):
        model = WanDiT(config)

    def materialize(module, prefix):
        for name, p in list(module.named_parameters(prefix=prefix)):
            mod_name, _, leaf = name.rpartition(".")
            t = draw(name, p.shape).to(torch.float32 if keeps_float32(name) else dtype)
            owner = model.get_submodule(mod_name)
            setattr(owner, leaf, torch.nn.Parameter(t, requires_grad=False))

    for name, child in model.named_children():
        if name != "blocks":
            materialize(child, name)
    for i, block in enumerate(model.blocks):
        materialize(block, f"blocks.{i}")
        if fp8 is not None:
            quantize_linears_(model, scaled=(fp8 == "scaled"), compute_dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def lora_grads_finite(net) -> tuple[bool, float]:
    """``(every LoRA gradient finite, their global L2 norm)`` after a backward pass."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    return bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads), norm


def train_steps(source, task: str = "t2v-A14B", steps: int = 3, grid=(1, 8, 8), rank: int = 32,
                fp8: str | None = "base", dtype=torch.bfloat16, seed: int = 0, blocks_to_swap: int = 0,
                offload_activations: bool = False, stash_dtype: torch.dtype | None = None) -> dict:
    """Get the expert with ``fp8`` and train a LoRA ``steps`` steps on the CPU with gradient
    checkpointing.

    Args:
        source: a checkpoint folder (``load_dit`` streams its shards) or a
            :class:`~wanlora.models.dit.WanDiTConfig` (:func:`build_expert` builds it in memory).
        grid: latent ``(frames, height, width)``; tokens = frames·height·width/4.
        blocks_to_swap: ``--blocks_to_swap`` (the host→host schedule of
            :class:`~wanlora.models.block_swap.BlockSwap` on the CPU: it adds one slot per resident
            moving block and copies, and saves nothing here; it runs to prove the path at size).
        offload_activations: ``--gradient_checkpointing_cpu_offload`` (``stash_dtype``: its
            ``--gradient_checkpointing_cpu_offload_dtype``).

    Returns:
        ``{"load_seconds", "load_peak_rss", "model_bytes", "step_seconds": [...], "losses": [...],
        "grads_finite": [...], "grad_norms": [...], "peak_rss", "tokens", "lora_changed",
        "swap_copies", "max_resident"}`` (bytes, seconds).
    """
    from wanlora.models import load_dit
    from wanlora.models.block_swap import place_with_block_swap
    from wanlora.networks.lora_wan import create_network

    torch.manual_seed(seed)
    reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    if isinstance(source, (str, os.PathLike)):
        dit = load_dit(source, task, dtype=dtype, device="cpu", fp8=fp8)
    else:
        dit = build_expert(source, fp8=fp8, dtype=dtype, seed=seed)
    load_seconds = time.perf_counter() - t0
    load_peak = peak_rss_bytes() - base
    model_bytes = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    print(f"  model ready in {load_seconds:.0f} s: {model_bytes / 1e9:.2f} GB, RSS {rss_bytes() / 1e9:.2f} GB",
          flush=True)
    swap = place_with_block_swap(dit, blocks_to_swap, "cpu") if blocks_to_swap else None
    net = create_network(1.0, rank, rank, None, None, dit)
    net.apply_to(None, dit)
    net.requires_grad_(True)
    dit.set_gradient_checkpointing(True, cpu_offload=offload_activations, stash_dtype=stash_dtype)
    dit.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    cfg = dit.config
    f, h, w = grid
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(1, cfg.out_channels, f, h, w, generator=g)
    ctx = [torch.randn(64, cfg.text_dim, generator=g) * 0.1]
    times, losses, finite, norms = [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        sigma = torch.rand(1, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = (1 - sigma) * x0 + sigma * noise  # flow matching: x_t, target noise - x0
        v = dit(x_t, sigma * 1000.0, ctx)
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        loss.backward()
        ok, norm = lora_grads_finite(net)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        finite.append(ok)
        norms.append(norm)
        print(f"  step {len(times)}: {times[-1]:.1f} s, loss {losses[-1]:.4f}, LoRA grads finite {ok} "
              f"(norm {norm:.3g}), RSS {rss_bytes() / 1e9:.2f} GB, peak {peak_rss_bytes() / 1e9:.2f} GB", flush=True)
    changed = any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    return {"load_seconds": load_seconds, "load_peak_rss": load_peak, "model_bytes": model_bytes,
            "step_seconds": times, "losses": losses, "grads_finite": finite, "grad_norms": norms,
            "peak_rss": peak_rss_bytes(), "baseline_rss": base, "tokens": f * (h // 2) * (w // 2),
            "lora_changed": changed, "swap_copies": swap.copies if swap else 0,
            "max_resident": swap.max_resident if swap else len(dit.blocks)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a real-size random A14B expert on the CPU with fp8 base weights")
    p.add_argument("--folder", help="load from the official six-shard layout in this folder (written first when "
                   "absent: 28.6 GB, outside the repository); default: build the expert in memory")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=3, default=(1, 8, 8), metavar=("F", "H", "W"),
                   help="latent frames, height, width (tokens = F·H·W/4)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (rank 32 adds 2.3 GB of LoRA + AdamW state)")
    p.add_argument("--fp8", choices=["base", "scaled"], default="base")
    p.add_argument("--blocks_to_swap", type=int, default=0, help="host→host block swap (proves the path)")
    p.add_argument("--offload_activations", action="store_true", help="--gradient_checkpointing_cpu_offload")
    p.add_argument("--stash_dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min_available_gb", type=float, default=17.5,
                   help="refuse to train unless the host has this much available memory")
    p.add_argument("--write_only", action="store_true")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    from common import report  # here, not at the top: the tests load this file as a module from elsewhere

    from wanlora.training.memory import MemorySettings, estimate_memory

    torch.set_num_threads(a.threads)
    cfg = expert_config()
    wrote = {"bytes": None, "seconds": None}
    if a.folder:
        print(f"writing {a.folder} ...", flush=True)
        wrote = write_expert(a.folder, cfg)
        print(f"shards: {wrote['bytes'] / 1e9:.2f} GB, {wrote['seconds']:.0f} s", flush=True)
    elif a.write_only:
        p.error("--write_only needs --folder")
    if a.write_only:
        return 0
    avail = available_bytes()
    if avail < a.min_available_gb * 1e9:
        print(f"refusing to train: {avail / 1e9:.1f} GB available < {a.min_available_gb} GB")
        return 3
    res = train_steps(a.folder or cfg, steps=a.steps, grid=tuple(a.grid), rank=a.rank, fp8=a.fp8,
                      blocks_to_swap=a.blocks_to_swap, offload_activations=a.offload_activations,
                      stash_dtype=torch.bfloat16 if a.stash_dtype == "bf16" else None)
    f, h, w = a.grid
    pred = estimate_memory(MemorySettings("t2v-A14B", width=w * 8, height=h * 8, frames=4 * (f - 1) + 1,
                                          rank=a.rank, fp8=a.fp8, device="cpu"))
    res.update({"source": a.folder or "memory", "shard_bytes": wrote["bytes"], "write_seconds": wrote["seconds"],
                "threads": torch.get_num_threads(), "available_before": avail,
                "predicted_host_peak": pred.host_total})
    report(res, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
