"""Latent caching: plan every item's frame windows, decode them in workers, encode with the VAE.

:func:`plan_latent_caches` probes each item (no pixel decoding), picks its bucket and windows and
checks the caches already on disk (:mod:`wanlora.dataset.caches`); :func:`cache_latents` decodes
the items that need work in ``num_workers`` processes (a ``DataLoader``) ahead of the VAE, encodes
windows of equal shape in batches and writes one ``.safetensors`` per window. A failing item is
recorded with its reason and never stops the others.

A task's image conditioning (:mod:`wanlora.conditioning`) adds its tensors to every cache file:
for I2V-A14B the ``y`` of each window's first frame (mask 4 + image latent 16 channels, the same
``y`` the generation pipeline builds for that frame), recorded as ``has_y = "1"``; for the Wan2.1
image models also ``clip_fea``, the CLIP features of the window's first (FLF2V: first and last)
frame, with the CLIP encoder's identity recorded as ``clip`` (another encoder makes the cache stale).

An entry with ``mask_directory`` adds each window's loss weights on the latent grid, ``mask`` float32
``[1, T, h, w]`` (:mod:`wanlora.dataset.masks`), recorded as ``has_mask = "1"`` with the mask file's
identity in ``mask`` (``"none"`` for an item without a mask: it trains with full weight); adding,
editing or removing a mask makes the cache stale.

Fun-Control tasks read each item's control clip (:attr:`MediaItem.control`) at the same frame
numbers as the target window, resized and cropped to the same bucket, and cache its VAE latent as
``latents_control`` in the same file (the control file's identity recorded as ``control``: an
edited control clip makes the cache stale). A control clip with fewer frames than a window needs
fails that item, naming both files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch

from wanlora.conditioning import conditioning_for, frames_to_video
from wanlora.dataset import caches as C
from wanlora.dataset.buckets import bucket_size
from wanlora.dataset.config import DatasetConfig, DatasetGroupConfig
from wanlora.dataset.frames import FrameWindow, frame_windows, resample_indices, window_source_indices
from wanlora.dataset.items import MediaItem, list_items
from wanlora.dataset.masks import find_mask, latent_mask, mask_index, mask_metadata, read_pixel_masks
from wanlora.io_utils import save_safetensors
from wanlora.tasks import Task
from wanlora.video_io import MediaError, image_size, probe_video, read_image, read_video_frames, resize_cover_crop

__all__ = [
    "WindowJob", "ItemJob", "DecodedItem", "CachePlan", "CacheReport", "plan_latent_caches", "cache_latents",
    "decode_item", "frames_to_video",
]

log = logging.getLogger("wanlora.commands.cache_latents")


@dataclass
class WindowJob:
    """One cache file to write: the window, the file's frame numbers and the metadata."""

    window: FrameWindow
    indices: list[int]
    path: Path
    metadata: dict[str, str]


@dataclass
class ItemJob:
    """One item with the windows that need (re)building."""

    item: MediaItem
    kind: str  # "image" or "video"
    size: tuple[int, int]
    windows: list[WindowJob]
    info: object = None  # VideoInfo for videos
    stale: list[Path] = field(default_factory=list)  # old caches of this item to remove once done
    mask: Path | None = None  # its loss mask (entries with mask_directory)
    media_size: tuple[int, int] | None = None  # displayed (W, H) of the media
    control_info: object = None  # VideoInfo of a video item's control clip (Fun-Control)


@dataclass
class DecodedItem:
    """The decoded pixels of one :class:`ItemJob`, per window: ``frames`` uint8 ``[F, H, W, 3]``;
    ``masks`` float32 ``[F, H, W]`` in [0, 1] when the item has a mask, else None; ``controls``
    uint8 ``[F, H, W, 3]``, the control clip's frames at the same frame numbers and size
    (Fun-Control), else None."""

    frames: list[np.ndarray]
    masks: list[np.ndarray] | None = None
    controls: list[np.ndarray] | None = None


@dataclass
class CachePlan:
    """The work of one caching run, decided before any decoding: the items with windows to
    encode, how many windows are already current, the items that failed planning, all items."""

    jobs: list[ItemJob]
    up_to_date: int  # windows already cached and current
    failed: list[tuple[str, str]]  # (item path, reason)
    items: int
    unmasked: list[str] = field(default_factory=list)  # items of entries with mask_directory but no mask


@dataclass
class CacheReport:
    """What a caching run did: windows written / skipped, items failed (with reasons)."""

    cached: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    items: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no item failed."""
        return not self.failed

    def summary(self, noun: str = "cache file(s)") -> str:
        """The counts in one line (files called ``noun``), then one ``FAILED`` line per failed item."""
        lines = [f"{self.items} item(s): {self.cached} {noun} written, {self.skipped} skipped as up to date, "
                 f"{len(self.failed)} item(s) failed ({self.seconds:.1f} s)"]
        # a reason that already starts with the path (an item problem) is not prefixed again
        lines += [f"  FAILED {why}" if why.startswith(f"{src}:") else f"  FAILED {src}: {why}"
                  for src, why in self.failed]
        return "\n".join(lines)


def _frame_sequence(ds: DatasetConfig, info, task: Task) -> tuple[list[int] | None, str]:
    """File frame numbers of the clip's frame sequence (None = all frames) and a description."""
    if ds.source_fps is None:
        return None, f"{info.frame_count} frames"
    if info.is_folder:
        times = [i / ds.source_fps for i in range(info.frame_count)]
        seq = resample_indices(times, task.fps)
    else:
        scale = (info.fps / ds.source_fps) if info.fps else 1.0
        seq = resample_indices(info.timestamps, task.fps, time_scale=scale)
    return seq, f"{len(seq)} frames after resampling {info.frame_count} frames at {ds.source_fps:g} fps to {task.fps} fps"


def plan_item(ds: DatasetConfig, item: MediaItem, task: Task, vae_identity: str, vae_kind: str,
              force: bool = False, clip_identity: str | None = None,
              masks: dict[str, list[Path]] | None = None) -> tuple[ItemJob | None, int, str | None]:
    """Plan one item: ``(job or None, windows up to date, failure reason or None)``; ``clip_identity``
    is recorded for the conditionings that cache CLIP features; ``masks`` is the entry's
    :func:`wanlora.dataset.masks.mask_index` (entries with ``mask_directory``)."""
    if item.problem:
        return None, 0, item.problem
    try:
        mask = find_mask(masks, item.stem, item.path) if masks is not None else None
        if ds.kind == "image":
            w, h = image_size(item.path)
            info, seq, windows, desc = None, None, [FrameWindow(0, 1)], "image"
        else:
            info = probe_video(item.path)
            w, h = info.width, info.height
            seq, desc = _frame_sequence(ds, info, task)
            count = info.frame_count if seq is None else len(seq)
            windows = frame_windows(count, ds.frame_extraction, ds.target_frames, ds.frame_stride,
                                    ds.frame_sample, ds.max_frames)
            if not windows:
                want = f"max_frames {ds.max_frames}" if ds.frame_extraction == "full" else f"target_frames {list(ds.target_frames)}"
                return None, 0, (f"{item.path}: clip has {desc}, shorter than every {want} "
                                 f"({ds.name}); lower target_frames or drop the clip")
        control_info = _check_control(ds, item, windows, seq)
    except ValueError as e:  # MediaError, or a control clip too short
        return None, 0, str(e)
    size = bucket_size(w, h, ds.resolution, task.pixel_unit, ds.enable_bucket, ds.bucket_no_upscale)
    ident = C.source_identity(item.path)
    cond = conditioning_for(task)
    common = {
        "format": C.LATENT_FORMAT, **ident, "source_fps": "" if ds.source_fps is None else f"{ds.source_fps:g}",
        "width": str(size[0]), "height": str(size[1]), "vae": vae_identity, "vae_kind": vae_kind,
        "task": task.name, "conditioning": cond.kind, "has_y": "0", **{f"has_{k}": "1" for k in cond.cache_keys},
        **({"clip": clip_identity or "none"} if cond.uses_clip else {}),
        **({"control": C.dumps(C.source_identity(item.control))} if item.control is not None else {}),
        "dataset": ds.name, "config": str(ds.config_path), "options": C.dumps(ds.shaping_options()),
        **mask_metadata(ds.mask_directory, mask),
    }
    jobs, current = [], 0
    planned = set()
    for win in windows:
        indices = window_source_indices(win, seq)
        path = ds.cache_directory / C.latent_cache_name(item.stem, win.start, win.frames, size[0], size[1], vae_kind)
        planned.add(path.name)
        meta = {**common, "window_start": str(win.start), "window_frames": str(win.frames),
                "frame_indices": C.dumps(indices)}
        if not force and C.stale_reason(path, meta, C.LATENT_CONTENT_KEYS) is None:
            current += 1
            continue
        jobs.append(WindowJob(win, indices, path, meta))
    stale = [p for p in C.latent_caches_in(ds.cache_directory, vae_kind).get(item.stem, []) if p.name not in planned]
    job = ItemJob(item, ds.kind, size, jobs, info, stale, mask, (w, h), control_info) if (jobs or stale) else None
    return job, current, None


def plan_latent_caches(config: DatasetGroupConfig, vae_identity: str, vae_kind: str, force: bool = False,
                       clip_identity: str | None = None) -> CachePlan:
    """Plan every item of every entry (probing only; nothing decoded). See :func:`plan_item`."""
    jobs, failed, current, n, unmasked = [], [], 0, 0, []
    for ds in config.all_datasets:  # validation entries are cached alike
        masks = mask_index(ds.mask_directory, ds.kind) if ds.mask_directory is not None else None
        for item in list_items(ds):
            n += 1
            job, cur, why = plan_item(ds, item, config.task, vae_identity, vae_kind, force, clip_identity, masks)
            current += cur
            if why:
                failed.append((str(item.path), why))
                continue
            if job:
                jobs.append(job)
            if masks is not None and item.stem not in masks:
                unmasked.append(str(item.path))
    return CachePlan(jobs, current, failed, n, unmasked)


def _check_control(ds: DatasetConfig, item: MediaItem, windows: list[FrameWindow], seq):
    """Probe the item's control clip (Fun-Control): a readable image, or a video with every frame
    the windows read (the control clip's frame ``k`` goes with the target's frame ``k``).

    Returns:
        the control video's ``VideoInfo`` (``None`` for an image entry or no control clip).

    Raises:
        MediaError: an unreadable control file; ValueError: a control clip too short.
    """
    if item.control is None:
        return None
    if ds.kind == "image":
        image_size(item.control)
        return None
    info = probe_video(item.control)
    need = max(max(window_source_indices(w, seq)) for w in windows) + 1
    if info.frame_count < need:
        raise ValueError(f"{item.control}: the control clip has {info.frame_count} frames but {item.path} is "
                         f"trained on frames up to {need} ({ds.name}); its frame k pairs with the video's frame "
                         "k: give a control clip as long as the video, or lower target_frames")
    return info


def _read_windows(job: ItemJob, path: Path, info) -> list[np.ndarray]:
    """The frames of each window of ``job`` read from ``path`` (the item, or its control clip), in
    bucket size: uint8 ``[F, H, W, 3]`` per window."""
    if job.kind == "image":
        arr = np.asarray(resize_cover_crop(read_image(path), job.size))[None]
        return [arr for _ in job.windows]
    union = sorted({i for w in job.windows for i in w.indices})
    decoded = read_video_frames(path, union, size=job.size, info=info)
    pos = {i: k for k, i in enumerate(union)}
    return [decoded[[pos[i] for i in w.indices]] for w in job.windows]


def decode_item(job: ItemJob) -> DecodedItem:
    """Pixels of each window of ``job`` in bucket size (:class:`DecodedItem`), with its mask's weights
    and its control clip's frames (the same frame numbers, size and crop).

    Raises:
        MediaError: the media, its mask or its control clip cannot be decoded, or the mask does not
            fit the media.
    """
    frames = _read_windows(job, job.item.path, job.info)
    masks = None
    if job.mask is not None:
        masks = read_pixel_masks(job.mask, job.item.path, job.kind, [w.indices for w in job.windows], job.size,
                                 job.media_size, job.info.frame_count if job.info is not None else None)
    controls = None if job.item.control is None else _read_windows(job, job.item.control, job.control_info)
    return DecodedItem(frames, masks, controls)


class _DecodeSet(torch.utils.data.Dataset):
    def __init__(self, jobs: list[ItemJob]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        try:
            return i, decode_item(self.jobs[i]), None
        except MediaError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - a broken file must not stop the run
            return i, None, f"{self.jobs[i].item.path}: {type(e).__name__}: {e}"


def _collate(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


def iter_decoded(jobs: list[ItemJob], num_workers: int):
    """Yield ``(job_index, DecodedItem or None, error or None)``, decoded ahead in workers."""
    ds = _DecodeSet(jobs)
    if num_workers <= 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate, worker_init_fn=_worker_init,
                                         prefetch_factor=2, persistent_workers=False)
    yield from loader


def cache_latents(
    config: DatasetGroupConfig,
    vae,
    batch_size: int = 1,
    num_workers: int = 0,
    force: bool = False,
    debug_mode: str | None = None,
    progress: bool = True,
    clip=None,
) -> CacheReport:
    """Build every missing or stale latent cache of ``config``.

    Args:
        vae: a :class:`wanlora.models.vae.WanVAE` (``encode``, ``identity``, ``kind``); may be
            ``None`` with ``debug_mode``.
        batch_size: windows of equal shape encoded together.
        num_workers: decoding processes (0 decodes in this process).
        force: rebuild caches that are up to date.
        debug_mode: ``"video"`` or ``"image"``: write the exact frames that would be trained to
            ``{cache_directory}/debug/`` (an MP4, or a folder of PNGs, per window; an item's loss mask
            beside them as ``..._mask``, its weights as gray levels) and encode nothing.
        progress: show a tqdm bar (items/s).
        clip: the CLIP image encoder (:func:`wanlora.models.load_clip`) for the tasks whose
            conditioning caches CLIP features (``i2v-14B``, ``flf2v-14B``); ignored by the others.

    Returns:
        :class:`CacheReport`; a failed item is listed with its reason, the others are still cached.

    Raises:
        ValueError: a VAE of the wrong family, or no ``clip`` for a task that needs it.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    task = config.task
    cond = conditioning_for(task)
    vae_kind = vae.kind if vae is not None else task.vae
    identity = vae.identity if vae is not None else "debug"
    _check_encoders(task, cond, vae, clip, debug_mode)
    clip_identity = clip.identity if clip is not None and cond.uses_clip else None
    plan = plan_latent_caches(config, identity, vae_kind, force=force or bool(debug_mode), clip_identity=clip_identity)
    report = CacheReport(skipped=0 if debug_mode else plan.up_to_date, failed=list(plan.failed), items=plan.items)
    for src, why in plan.failed:
        log.warning("skipping %s", why)
    if plan.unmasked:
        shown = ", ".join(Path(p).name for p in plan.unmasked[:5]) + (", ..." if len(plan.unmasked) > 5 else "")
        log.warning("%d item(s) have no mask in their entry's mask_directory and train with full weight: %s "
                    "(a mask is named after its media: clip.mp4 -> clip.png, clip.mp4 or a folder clip/)",
                    len(plan.unmasked), shown)
    for job in plan.jobs:  # up to date, only old windows to drop (e.g. fewer target_frames)
        if not job.windows and not debug_mode:
            for p in job.stale:
                p.unlink(missing_ok=True)
    jobs = [job for job in plan.jobs if job.windows]
    pending: dict[tuple, list[tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]] = {}
    done_windows: dict[int, int] = {}
    failed_jobs: set[int] = set()

    def finish_item(j: int) -> None:
        job = jobs[j]
        if j in failed_jobs or done_windows.get(j, 0) < len(job.windows) or debug_mode:
            return
        for p in job.stale:
            p.unlink(missing_ok=True)

    def flush(key) -> None:
        entries = pending.pop(key, [])
        if not entries:
            return
        videos = torch.stack([v for _, _, v, _, _ in entries])
        controls = torch.stack([c for *_, c in entries]) if entries[0][4] is not None else None
        try:
            lat = vae.encode(videos).float().cpu()
            extra = {k: v.cpu() for k, v in cond.cache_tensors(vae, videos, clip, control=controls).items()}
        except Exception as e:  # noqa: BLE001
            for j, *_ in entries:
                if j not in failed_jobs:
                    failed_jobs.add(j)
                    report.failed.append((str(jobs[j].item.path), f"VAE encoding failed: {type(e).__name__}: {e}"))
            return
        for b, (j, k, _, mask, _) in enumerate(entries):
            if j in failed_jobs:
                continue
            wj = jobs[j].windows[k]
            tensors = {"latents": lat[b].clone(), **{k: v[b].clone() for k, v in extra.items()}}
            if mask is not None:
                tensors["mask"] = mask
            save_safetensors(tensors, wj.path, metadata=wj.metadata)
            report.cached += 1
            done_windows[j] = done_windows.get(j, 0) + 1
            finish_item(j)

    bar = tqdm(total=len(jobs), unit="item", disable=not progress, desc="caching latents", dynamic_ncols=True)
    for j, decoded, error in iter_decoded(jobs, num_workers):
        bar.update(1)
        job = jobs[j]
        if error is not None:
            failed_jobs.add(j)
            report.failed.append((str(job.item.path), error))
            continue
        for k, (wj, frames) in enumerate(zip(job.windows, decoded.frames)):
            if debug_mode:
                _write_debug(wj.path, frames, decoded, k, debug_mode, task.fps)
                report.cached += 1
                continue
            video = frames_to_video(frames)
            mask = latent_mask(decoded.masks[k], task.vae_stride) if decoded.masks is not None else None
            key = tuple(video.shape)
            ctrl = None if decoded.controls is None else frames_to_video(decoded.controls[k])
            pending.setdefault(key, []).append((j, k, video, mask, ctrl))
            if len(pending[key]) >= batch_size:
                flush(key)
    for key in list(pending):
        flush(key)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _check_encoders(task, cond, vae, clip, debug_mode) -> None:
    """The VAE's family against ``task``, and a CLIP encoder where the conditioning caches its features.

    Raises:
        ValueError: naming the flag and the file to pass.
    """
    if vae is not None and vae.kind != task.vae:
        raise ValueError(f"--vae is the {vae.kind} VAE but task {task.name} uses the {task.vae} VAE; "
                         f"pass the {'Wan2.1_VAE.pth' if task.vae == 'wan2.1' else 'Wan2.2_VAE.pth'} file")
    if cond.uses_clip and clip is None and not debug_mode:
        raise ValueError(f"task {task.name} caches CLIP image features: pass the CLIP image encoder with --clip "
                         "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors)")


def _write_debug(cache_path: Path, frames, decoded, k: int, debug_mode: str, fps: float) -> None:
    """``--debug_mode``: window ``k``'s frames (uint8 ``[T, H, W, 3]``) as they would be trained, to
    ``{cache folder}/debug/`` (an MP4 for ``"video"``, PNGs for ``"image"``), with its loss mask as gray
    frames (``..._mask``) and its Fun-Control frames (``..._control``) beside them."""
    from wanlora.video_io import write_images, write_video

    out = cache_path.parent / "debug" / cache_path.name.replace(".safetensors", "")
    shown = [(out, frames)]
    if decoded.masks is not None:  # the loss weights as gray frames, aligned with the frames
        gray = np.rint(decoded.masks[k] * 255).astype(np.uint8)
        shown.append((out.with_name(out.name + "_mask"), np.repeat(gray[..., None], 3, axis=-1)))
    if decoded.controls is not None:  # Fun-Control: the control frames trained with them
        shown.append((out.with_name(out.name + "_control"), decoded.controls[k]))
    for dst, pixels in shown:
        if debug_mode == "video":
            write_video(dst.with_suffix(".mp4"), pixels, fps=fps)
        else:
            write_images(dst, pixels)
