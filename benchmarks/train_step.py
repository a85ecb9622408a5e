"""Seconds per training step and peak memory: the trainer's loop against a bare step.

Both sides train the same LoRA (``networks.lora_wan``, all 10 Linear layers of every block) on the
same random-weight DiT and the same batch:

* **bare** — a hand-written step: draw noise and timestep, ``x_t``, forward, MSE to
  ``noise - x0``, backward, ``AdamW.step()``, ``zero_grad()``; nothing else;
* **trainer** — :func:`wanlora.training.trainer.train` (Accelerate, expert plan, data loader, timestep
  sampler, grad-norm clipping, logging bookkeeping, progress bar), timed between its per-step
  hook calls.

Each side runs ``--rounds`` times, interleaved, in its own subprocess so that peak memory (CUDA: ``max_memory_allocated``; CPU:
peak RSS) is its own. The loop overhead is ``trainer / bare - 1`` (target: under 5%).

    python benchmarks/train_step.py                         # CPU, small model
    python benchmarks/train_step.py --dim 5120 --layers 40 --ffn 13824 --heads 40 \\
        --frames 21 --height 60 --width 104 --dtype bf16 --checkpointing   # a GPU, A14B size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _build(a, device, dtype):
    """The random-weight DiT in ``load_dit``'s precision (``cast_dit``: fp32 islands kept), as the
    trainer gets it."""
    import torch

    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.models.loading import cast_dit

    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=a.dim, ffn_dim=a.ffn, num_heads=a.heads, num_layers=a.layers, in_channels=16,
                       out_channels=16, text_dim=a.text_dim)
    dit = WanDiT(cfg)
    for p in dit.parameters():  # the official init zeroes the head; give it weights
        torch.nn.init.normal_(p, std=0.02)
    return cast_dit(dit, dtype, device).eval().requires_grad_(False)


def _batch(a):
    import torch

    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(a.batch, 16, a.frames, a.height, a.width, generator=g),
            "context": [torch.randn(a.text_len, a.text_dim, generator=g) for _ in range(a.batch)],
            "keys": ["bench"] * a.batch}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 if platform.system() != "Darwin" else kb


def run_bare(a) -> dict:
    import torch

    from wanlora.training import flow
    from wanlora.networks.lora_wan import create_network

    dev = _device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dit = _build(a, dev, dtype)
    dit.set_gradient_checkpointing(a.checkpointing, segments=a.segments)
    net = create_network(1.0, a.rank, a.rank, None, None, dit)
    net.apply_to(None, dit)
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = _batch(a)
    x0 = batch["latents"].to(dev)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.rand(a.batch, generator=g) * 1000
        s = (t / 1000).to(dev)
        x_t = flow.add_noise(x0, noise, s)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = dit(x_t, t.to(dev), batch["context"])
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return {"side": "bare", "s_per_step": statistics.median(times), "peak_bytes": _peak_bytes()}


def run_trainer(a) -> dict:
    import tempfile

    import torch

    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import train

    batch = _batch(a)

    class OneBatch:
        def __len__(self):
            return 1000

        def __getitem__(self, pos):
            return batch

    stamps = []

    def hook(step, epoch, networks):
        if _device().type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        argv = ["--task", "t2v-1.3B", "--dit", "bench", "--dataset_config", "none.toml", "--output_dir", out,
                "--network_dim", str(a.rank), "--network_alpha", str(a.rank), "--learning_rate", "1e-4",
                "--max_train_steps", str(a.warmup + a.steps + 1), "--seed", "0", "--timestep_sampling", "uniform",
                "--max_data_loader_n_workers", "0", "--sample_every_n_steps", "1",
                "--mixed_precision", "bf16" if a.dtype == "bf16" else "no", "--dit_dtype", a.dtype]
        if a.checkpointing:
            argv.append("--gradient_checkpointing")
        if a.segments:
            argv += ["--gradient_checkpointing_segments", str(a.segments)]
        train(parse_config(argv), dataset=OneBatch(), load_dit=lambda *_, **k: _build(a, k["device"], k["dtype"]),
              sample_fn=hook)
    times = [b - a_ for a_, b in zip(stamps, stamps[1:])][a.warmup:]
    return {"side": "trainer", "s_per_step": statistics.median(times), "peak_bytes": _peak_bytes()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--text_dim", type=int, default=256)
    p.add_argument("--text_len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--segments", type=int, default=0,
                   help="with --checkpointing: --gradient_checkpointing_segments (two-level checkpointing)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=2, help="subprocess pairs (bare, trainer), interleaved")
    p.add_argument("--side", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        import logging

        import torch

        logging.disable(logging.WARNING)
        torch.set_num_threads(a.threads)
        res = run_bare(a) if a.side == "bare" else run_trainer(a)
        print("RESULT " + json.dumps(res))
        return 0
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1"}
    for side in ("bare", "trainer") * a.rounds:  # interleaved, to even out machine noise
        out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--side", side],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.split("RESULT ", 1)[1]))
    for r in rows:
        print(f"  {r['side']:8s} {r['s_per_step']:.4f} s/step", file=sys.stderr)
    res = {}
    for side in ("bare", "trainer"):
        r = [x for x in rows if x["side"] == side]
        res[side] = (min(x["s_per_step"] for x in r), max(x["peak_bytes"] for x in r))
    (tb, mb), (tt, mt) = res["bare"], res["trainer"]
    print(f"{'':8s} {'s/step':>9s} {'peak MiB':>9s}")
    print(f"{'bare':8s} {tb:9.4f} {mb / 2**20:9.1f}")
    print(f"{'trainer':8s} {tt:9.4f} {mt / 2**20:9.1f}")
    print(f"loop overhead: {100 * (tt / tb - 1):+.1f}% time, {100 * (mt / mb - 1):+.1f}% peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
