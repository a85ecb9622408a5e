"""Input pipeline: does the data loader keep up with the training step?

On a tiny model set (``wanlora.tools.tiny``) and the rendered demo clips (``wanlora.tools.demo``),
cached by the real commands (``wanlora-cache-latents``, ``wanlora-cache-text``), it measures with
the trainer's own data loader (:func:`wanlora.training.trainer.build_dataloader`: the cached
latents and text read from safetensors files, bucketed and batched):

* **loader alone**: batches per second over whole epochs with ``--max_data_loader_n_workers`` 0 and
  each of ``--workers``;
* **in the training loop**: seconds per step and the **data wait** per step — the time the loop was
  blocked on the loader (:meth:`wanlora.training.step_log.StepLog.timed`, what the progress bar shows
  as ``data_wait_ms``) — for the same worker counts.

The tiny DiT makes the step short, so the loader's share is as large as it gets: if the data wait is
small next to this step, it is smaller next to a real one.

    python benchmarks/input_pipeline.py --work /tmp/pipeline --steps 40 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def make_caches(work: Path, resolution: tuple[int, int], frames: int) -> tuple[dict, Path]:
    """Tiny t2v-A14B model set, demo media and their caches under ``work`` (kept when present).
    Returns (the model set's flags, the dataset TOML)."""
    from wanlora.commands import cache_latents, cache_text
    from wanlora.tools.demo import render_demo_media, write_dataset_toml
    from wanlora.tools.tiny import make_tiny

    models = work / "models"
    if not (models / "manifest.json").exists():
        make_tiny("t2v-A14B", models)
    flags = json.loads((models / "manifest.json").read_text())["flags"]
    toml = work / "dataset.toml"
    if not toml.exists():
        media = render_demo_media(work / "data", width=resolution[0], height=resolution[1], frames=frames)
        toml = write_dataset_toml(work, media / "videos", media / "images", resolution=resolution, frames=frames)
        cache_latents.main(["--task", "t2v-A14B", "--dataset_config", str(toml), "--vae", flags["--vae"]])
        cache_text.main(["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"]])
    return flags, toml


def _config(flags: dict, toml: Path, out: Path, workers: int, steps: int):
    from wanlora.commands.train import parse_config

    return parse_config(["--task", "t2v-A14B", "--dit", flags["--dit"], "--dataset_config", str(toml),
                         "--output_dir", str(out), "--output_name", "lora", "--network_dim", "8", "--seed", "0",
                         "--expert", "low", "--max_train_steps", str(steps), "--max_data_loader_n_workers",
                         str(workers), "--persistent_data_loader_workers"])


def loader_rate(config, epochs: int) -> dict:
    """Batches per second of the trainer's loader over ``epochs`` epochs (workers started in the first
    ``next``, counted: that is what a run pays too)."""
    from wanlora.tasks import get_task
    from wanlora.training.trainer import build_dataloader

    positions, loader = build_dataloader(config, get_task("t2v-A14B"), 0)
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        positions.epoch = epoch
        for _ in loader:
            n += 1
    s = time.perf_counter() - t0
    return {"batches": n, "s": s, "batches_per_s": n / s}


def training_wait(config, warmup: int) -> dict:
    """Median seconds per step and mean data wait per step of ``train(config)`` after ``warmup`` steps."""
    from accelerate.state import AcceleratorState

    from wanlora.training import trainer
    from wanlora.training.step_log import StepLog

    stamps, waits = [], []
    add = StepLog.add

    def recording_add(self, *a, **k):
        waits.append(self._wait)
        stamps.append(time.perf_counter())
        return add(self, *a, **k)

    StepLog.add = recording_add
    try:
        trainer.train(config)
    finally:
        StepLog.add = add
        AcceleratorState._reset_state(reset_partial_state=True)
    steps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    wait = waits[warmup + 1:]
    return {"steps": len(steps), "s_per_step": statistics.median(steps), "data_wait_s_mean": statistics.mean(wait),
            "data_wait_s_max": max(wait), "data_wait_share": statistics.mean(wait) / statistics.median(steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the tiny models, media and caches (reused)")
    p.add_argument("--resolution", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--workers", type=int, nargs="*", default=[2], help="worker counts besides 0")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the loader-alone measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    flags, toml = make_caches(work, tuple(a.resolution), a.frames)
    rows = []
    for workers in [0, *a.workers]:
        config = _config(flags, toml, work / f"out-{workers}", workers, a.steps + a.warmup + 1)
        row = {"workers": workers, "loader": loader_rate(config, a.epochs), "training": training_wait(config, a.warmup)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "threads": a.threads, "machine": platform.machine()}
    print("\n| workers | loader batches/s | training s/step | data wait per step (mean / max) | share of the step |")
    print("|---|---|---|---|---|")
    for r in rows:
        t = r["training"]
        print(f"| {r['workers']} | {r['loader']['batches_per_s']:.1f} | {t['s_per_step'] * 1000:.1f} ms | "
              f"{t['data_wait_s_mean'] * 1000:.2f} / {t['data_wait_s_max'] * 1000:.2f} ms | "
              f"{100 * t['data_wait_share']:.1f} % |")
    if a.json:
        Path(a.json).write_text(json.dumps({"environment": env, "argv": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
