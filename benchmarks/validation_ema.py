"""Validation curves per expert, raw LoRA against its EMA, on the demo data (tiny t2v-A14B models).

The demo's three clips and two stills train both experts; the clips are also cached a second
time as ``[[validation_datasets]]`` (the same media: this measures fit, not generalization). The
run logs ``val_loss`` per expert with the raw and the EMA weights every ``--every`` steps; the
script prints them as a table (markdown) read back from TensorBoard, and the post-hoc EMA of the
step saves against the training EMA at the end.

    python benchmarks/validation_ema.py --work /tmp/val_ema --steps 120 --every 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--ema_decay", type=float, default=0.95)
    ap.add_argument("--learning_rate", type=float, default=2e-3)
    a = ap.parse_args(argv)

    import torch

    from wanlora.commands import cache_latents, cache_text
    from wanlora.commands.train import parse_config
    from wanlora.tools.demo import render_demo_media, write_dataset_toml
    from wanlora.tools.tiny import make_tiny
    from wanlora.training.trainer import train

    torch.set_num_threads(2)
    work = a.work
    models = work / "models"
    if not (models / "manifest.json").exists():
        make_tiny("t2v-A14B", models)
    flags = json.loads((models / "manifest.json").read_text())["flags"]
    data = render_demo_media(work / "data")
    toml = write_dataset_toml(work, data / "videos", data / "images", resolution=(64, 64), frames=17)
    toml.write_text(toml.read_text() + "\n[[validation_datasets]]\nvideo_directory = "
                    f"{json.dumps(str(data / 'videos'))}\ncache_directory = {json.dumps(str(work / 'cache' / 'val'))}\n"
                    "target_frames = [17]\n")
    cache_latents.main(["--task", "t2v-A14B", "--dataset_config", str(toml), "--vae", flags["--vae"]])
    cache_text.main(["--dataset_config", str(toml), "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"]])

    out, logs = work / "out", work / "logs"
    argv = ["--task", "t2v-A14B", "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
            "--dataset_config", str(toml), "--output_dir", str(out), "--output_name", "demo", "--network_dim", "8",
            "--network_alpha", "8", "--learning_rate", str(a.learning_rate), "--seed", "42",
            "--max_train_steps", str(a.steps), "--max_data_loader_n_workers", "0", "--timestep_sampling", "shift",
            "--discrete_flow_shift", "3", "--validate_every_n_steps", str(a.every), "--ema_decay", str(a.ema_decay),
            "--save_every_n_steps", str(a.every), "--logging_dir", str(logs)]
    t0 = time.perf_counter()
    train(parse_config(argv))
    took = time.perf_counter() - t0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = logs.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    cols = ["val_loss/high_noise", "val_loss_ema/high_noise", "val_loss/low_noise", "val_loss_ema/low_noise",
            "val_loss", "val_loss_ema"]
    series = {c: {e.step: e.value for e in acc.Scalars(c)} for c in cols}
    print(f"\n{a.steps} steps, validation every {a.every}, --ema_decay {a.ema_decay}: {took:.0f} s (CPU)\n")
    print("| step | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for step in sorted(series["val_loss"]):
        print(f"| {step} | " + " | ".join(f"{series[c][step]:.4f}" for c in cols) + " |")

    # post-hoc EMA of the step saves (exponential, the same decay, no warm-up) against the training EMA
    from safetensors.torch import load_file

    from wanlora.lora.posthoc_ema import posthoc_ema

    for e in ("high_noise", "low_noise"):
        steps = sorted(out.glob(f"demo-step*_{e}.safetensors")) + [out / f"demo_{e}.safetensors"]
        steps = [p for p in steps if "_ema" not in p.name]
        dst = work / f"posthoc_{e}.safetensors"
        rec = posthoc_ema(steps, dst, decay=a.ema_decay)
        ema, post = load_file(out / f"demo_ema_{e}.safetensors"), load_file(dst)
        num = sum(float((post[k] - ema[k]).norm() ** 2) for k in ema if not k.endswith("alpha")) ** 0.5
        den = sum(float(ema[k].norm() ** 2) for k in ema if not k.endswith("alpha")) ** 0.5
        print(f"{e}: post-hoc EMA of {len(rec['steps'])} saves vs training EMA: relative L2 difference {num / den:.3f}")


if __name__ == "__main__":
    main()
