"""The demo's own pieces (``make demo`` itself is not part of the suite; its command chain is, in
tests/test_end_to_end.py): the rendered dataset, its TOML, and the loss plots."""

from __future__ import annotations

from pathlib import Path

import av
from PIL import Image

from wanlora.dataset import load_dataset_config
from wanlora.tools.demo import plot_losses, render_demo_media, write_dataset_toml


def test_rendered_dataset_validates_even_under_an_awkward_path(tmp_path):
    work = tmp_path / 'a "quoted" \\ folder'
    data = render_demo_media(work / "data", width=32, height=32, frames=9, fps=16)
    clips = sorted((data / "videos").glob("*.mp4"))
    assert len(clips) == 3 and all(c.with_suffix(".txt").read_text().strip() for c in clips)
    with av.open(str(clips[0])) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (32, 32)
    stills = sorted((data / "images").glob("*.png"))
    assert len(stills) == 2 and Image.open(stills[0]).size == (32, 32)
    toml = write_dataset_toml(work, data / "videos", data / "images", resolution=(32, 32), frames=9)
    config = load_dataset_config(toml, "t2v-A14B")
    assert len(config.datasets) == 2


def test_loss_plots_one_png_per_loss_tag(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "logs" / "run")) as w:
        for step in range(5):
            w.add_scalar("loss/high_noise", 1.0 / (step + 1), step)
            w.add_scalar("loss/low_noise", 2.0 / (step + 1), step)
            w.add_scalar("lr", 1e-3, step)
    plots = plot_losses(tmp_path / "logs", tmp_path / "plots")
    assert sorted(p.name for p in plots) == ["loss_high_noise.png", "loss_low_noise.png"]
    assert all(Image.open(p).size[0] > 100 for p in plots)
