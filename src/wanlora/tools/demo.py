"""``make demo``: the whole chain on tiny models, exactly as the README documents it.

1. renders a small captioned dataset of short clips and images into ``WORK/data`` (or uses
   ``--data FOLDER``, a folder of your own clips/images with ``.txt`` captions);
2. writes ``WORK/dataset.toml`` and ``WORK/prompts.txt``;
3. runs the README's quick-start commands (:data:`wanlora.tools.quickstart.T2V_BOTH_EXPERTS`) one by one:
   tiny ``t2v-A14B`` model set, cache latents, cache text, ``accelerate launch -m wanlora.train`` with
   both experts and samples during training, ``wanlora-generate`` with both LoRAs, and
   ``wanlora-convert-lora --target comfy``;
4. plots the loss of each expert from the TensorBoard logs and prints what was made and where.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wanlora.io_utils import write_text
from wanlora.tools.quickstart import T2V_BOTH_EXPERTS, Recipe, expand

__all__ = ["render_demo_media", "write_dataset_toml", "write_prompts", "run_recipe", "main"]

VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

_CLIPS = (
    ("red_ball", (220, 40, 40), "a red ball bounces across a wooden floor"),
    ("blue_square", (40, 80, 220), "a blue square slides from left to right over a pale wall"),
    ("green_disc", (40, 180, 90), "a green disc grows in the middle of a dark room"),
)


def _frame(kind: str, color, t: float, w: int, h: int) -> np.ndarray:
    """One RGB frame ``[h, w, 3]`` uint8 of a simple moving shape at time ``t`` in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.empty((h, w, 3), np.float32)
    bg[...] = (150 + 40 * yy / h)[..., None] * np.array([0.8, 0.6, 0.4])  # wooden-ish gradient
    if kind == "red_ball":
        cx, cy, r = w * (0.15 + 0.7 * t), h * (0.75 - 0.5 * abs(math.sin(3 * math.pi * t))), h / 7
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif kind == "blue_square":
        bg[...] = 225
        cx, cy, r = w * (0.15 + 0.7 * t), h / 2, h / 6
        mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    else:
        bg[...] = 30
        r = h * (0.1 + 0.3 * t)
        mask = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 <= r * r
    bg[mask] = color
    return bg.clip(0, 255).astype(np.uint8)


def render_demo_media(folder: Path, width: int = 96, height: int = 64, frames: int = 33,
                      fps: int = 16) -> Path:
    """Render the demo dataset: three short MP4 clips and two PNG stills with ``.txt`` captions.

    Layout: ``folder/videos/*.mp4`` and ``folder/images/*.png``, captions beside each file.
    Returns ``folder``.
    """
    from PIL import Image

    from wanlora.video_io import write_video

    (folder / "videos").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, color, caption in _CLIPS:
        clip = np.stack([_frame(name, color, i / (frames - 1), width, height) for i in range(frames)])
        write_video(folder / "videos" / f"{name}.mp4", clip, fps=fps)
        write_text(folder / "videos" / f"{name}.txt", caption + "\n")
    for name, color, caption in _CLIPS[:2]:
        Image.fromarray(_frame(name, color, 0.5, width, height)).save(folder / "images" / f"{name}.png")
        write_text(folder / "images" / f"{name}.txt", caption.replace("bounces", "rests")
                   .replace("slides", "stands") + "\n")
    return folder


def _toml_path(path: Path) -> str:
    """``path`` as a TOML basic string (a JSON string is one: same quotes and escapes)."""
    return json.dumps(Path(path).as_posix())


def write_dataset_toml(work: Path, video_dir: Path | None, image_dir: Path | None,
                       resolution: tuple[int, int] = (64, 64), frames: int = 17) -> Path:
    """Write ``work/dataset.toml`` for a video and/or image folder (captions in ``.txt``).

    ``resolution`` is (width, height); video items are cut into ``frames``-frame windows from the
    head of each clip. Caches go to ``work/cache/``.
    """
    lines = [
        "# Written by wanlora.tools.demo — see docs/dataset.md for every key.",
        "[general]",
        f"resolution = [{resolution[0]}, {resolution[1]}]",
        'caption_extension = ".txt"',
        "batch_size = 1",
        "enable_bucket = true",
        "bucket_no_upscale = false",
        "",
    ]
    if video_dir is not None:
        lines += [
            "[[datasets]]",
            f"video_directory = {_toml_path(video_dir)}",
            f"cache_directory = {_toml_path(work / 'cache' / 'video')}",
            f"target_frames = [{frames}]",
            'frame_extraction = "head"',
            "",
        ]
    if image_dir is not None:
        lines += [
            "[[datasets]]",
            f"image_directory = {_toml_path(image_dir)}",
            f"cache_directory = {_toml_path(work / 'cache' / 'image')}",
            "",
        ]
    path = work / "dataset.toml"
    write_text(path, "\n".join(lines))
    return path


def write_prompts(work: Path, prompts: list[str], size=(64, 64), frames: int = 17,
                  steps: int = 8, seed: int = 42) -> Path:
    """Write ``work/prompts.txt`` (one prompt a line with inline ``--w --h --f --s --d``)."""
    text = "# Sample prompts for training-time samples (docs/generation.md, prompt files)\n"
    text += "".join(
        f"{p} --w {size[0]} --h {size[1]} --f {frames} --s {steps} --d {seed + i}\n"
        for i, p in enumerate(prompts)
    )
    path = work / "prompts.txt"
    write_text(path, text)
    return path


def run_recipe(recipe: Recipe, env: dict[str, str], log=print, skip_first: bool = False) -> list[float]:
    """Run each command of ``recipe`` as a subprocess; return the seconds each took.

    The console scripts (``wanlora-*``, ``accelerate``) are looked up beside the running Python
    first, so the chain works from a virtual environment that is not activated.

    Raises:
        subprocess.CalledProcessError: a command failed (its output was streamed already).
    """
    bindir = Path(sys.executable).parent
    full_env = {**os.environ, **env, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    times = []
    for i, cmd in enumerate(recipe.commands):
        if skip_first and i == 0:
            continue
        argv = expand(cmd, env)
        if argv[0] == "python":
            argv[0] = sys.executable
        log(f"\n$ {cmd}")
        t0 = time.perf_counter()
        subprocess.run(argv, env=full_env, check=True)
        times.append(time.perf_counter() - t0)
        log(f"  ({times[-1]:.1f} s)")
    return times


def plot_losses(logdir: Path, out_dir: Path) -> list[Path]:
    """Plot every TensorBoard scalar whose tag contains ``loss`` to ``out_dir/<tag>.png``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if "loss" in tag:
                series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    written = []
    for tag, points in sorted(series.items()):
        points.sort()
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(tag)
        fig.tight_layout()
        path = out_dir / f"{tag.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _find_media(folder: Path) -> tuple[Path | None, Path | None]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    has_video = any(p.suffix.lower() in VIDEO_EXTS for p in files)
    has_image = any(p.suffix.lower() in IMAGE_EXTS for p in files)
    return (folder if has_video else None, folder if has_image else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("demo_work"),
                        help="work folder (default: ./demo_work); emptied first")
    parser.add_argument("--data", type=Path, default=None,
                        help="your own folder of clips/images with .txt captions "
                             "(default: render a small synthetic dataset)")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.data is not None:
        data = args.data.resolve()
        if not data.is_dir():
            parser.error(f"--data {data}: no such folder")
        video_dir, image_dir = _find_media(data)
        if video_dir is None and image_dir is None:
            parser.error(f"--data {data}: holds no videos ({', '.join(sorted(VIDEO_EXTS))}) "
                         f"or images ({', '.join(sorted(IMAGE_EXTS))})")
    else:
        render_demo_media(work / "data")
        video_dir, image_dir = work / "data" / "videos", work / "data" / "images"
    write_dataset_toml(work, video_dir, image_dir)
    write_prompts(work, [c[2] for c in _CLIPS[:2]])

    env = {"MODELS": str(work / "models"), "WORK": str(work)}
    print(f"wanlora demo — work folder {work}")
    run_recipe(T2V_BOTH_EXPERTS, env)
    plots = plot_losses(work / "logs", work / "plots")

    out = work / "output"
    print("\n" + "=" * 72)
    print(f"Done in {time.perf_counter() - t_start:.0f} s. What was made:")
    print(f"  tiny model set:    {work / 'models'}")
    print(f"  caches:            {work / 'cache'}")
    for f in sorted(out.glob("*.safetensors")):
        print(f"  LoRA:              {f}")
    for f in sorted((out / "sample").glob("*.mp4")):
        print(f"  training sample:   {f}")
    for f in sorted((work / "generated").glob("*.mp4")):
        print(f"  generated video:   {f}")
    for f in sorted((work / "comfy").glob("*.safetensors")):
        print(f"  ComfyUI LoRA:      {f}")
    for f in plots:
        print(f"  loss plot:         {f}")
    print(f"  TensorBoard:       tensorboard --logdir {work / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
