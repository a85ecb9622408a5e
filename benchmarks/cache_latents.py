"""Latent-caching throughput: decode alone, and decode + VAE encode (tiny and medium VAEs).

    python benchmarks/cache_latents.py [--media ../shared/media] [--resolution 128 128]
        [--frames 17] [--workers 0 2] [--vae_dims 8 32] [--kind wan2.1] [--device cpu]

Builds a dataset of the real clips (``frame_extraction = "chunk"`` windows of ``--frames``),
then measures, per setting, windows per second ("clips/s") and pixel frames per second:

* ``decode``: probing, decoding, resizing and cropping every window (the worker side);
* ``decode+encode dimN``: the whole ``cache_latents`` run with a random Wan VAE of base width N
  (8 = the tiny test VAE; the released Wan2.1 VAE is 96, Wan2.2 160), caches written to a
  temporary folder. Prints a Markdown table for ``.dev/bench_D.md`` / ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from wanlora.dataset.config import load_dataset_config
from wanlora.dataset.latent_caching import cache_latents, iter_decoded, plan_latent_caches

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(tmp: Path, media: Path, resolution, frames: int, task: str):
    clips = tmp / "clips"
    clips.mkdir()
    for p in sorted(media.glob("*.mp4")):
        (clips / p.name).symlink_to(p)
        (clips / (p.stem + ".txt")).write_text(p.stem)
    toml = tmp / "d.toml"
    toml.write_text(f'[[datasets]]\nvideo_directory = "clips"\ncache_directory = "cache"\n'
                    f'resolution = [{resolution[0]}, {resolution[1]}]\nenable_bucket = true\n'
                    f'target_frames = [{frames}]\nframe_extraction = "chunk"\n')
    return load_dataset_config(toml, task)


def bench_decode(cfg, workers: int) -> tuple[int, int, float]:
    plan = plan_latent_caches(cfg, "bench", cfg.task.vae, force=True)
    t0 = time.perf_counter()
    windows = frames = 0
    for _, decoded, err in iter_decoded(plan.jobs, workers):
        assert err is None, err
        wins = decoded.frames
        windows += len(wins)
        frames += sum(w.shape[0] for w in wins)
    return windows, frames, time.perf_counter() - t0


def bench_encode(cfg, dim: int, kind: str, workers: int, batch: int, device: str) -> tuple[int, int, float]:
    from wanlora.models.vae import WanVAE, build_vae

    torch.manual_seed(0)
    vae = WanVAE(build_vae(kind, dim=dim, dec_dim=dim if kind == "wan2.2" else None)).to(device)
    t0 = time.perf_counter()
    report = cache_latents(cfg, vae, batch_size=batch, num_workers=workers, force=True, progress=False)
    dt = time.perf_counter() - t0
    assert report.ok, report.summary()
    plan = plan_latent_caches(cfg, vae.identity, kind, force=True)
    frames = sum(w.window.frames for j in plan.jobs for w in j.windows)
    return report.cached, frames, dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    ap.add_argument("--resolution", type=int, nargs=2, default=(128, 128))
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--vae_dims", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--kind", default="wan2.1", choices=("wan2.1", "wan2.2"))
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = "t2v-A14B" if args.kind == "wan2.1" else "ti2v-5B"
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, resolution {args.resolution}, {args.frames}-frame chunk windows, {args.kind}")
    print("| what | workers | windows | frames | seconds | clips/s | frames/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as d:
        cfg = make_dataset(Path(d), args.media, args.resolution, args.frames, task)
        for w in args.workers:
            n, f, dt = bench_decode(cfg, w)
            print(f"| decode | {w} | {n} | {f} | {dt:.2f} | {n / dt:.2f} | {f / dt:.1f} |", flush=True)
        for dim in args.vae_dims:
            for w in args.workers:
                n, f, dt = bench_encode(cfg, dim, args.kind, w, args.batch_size, args.device)
                print(f"| decode+encode dim{dim} | {w} | {n} | {f} | {dt:.2f} | {n / dt:.2f} | {f / dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
