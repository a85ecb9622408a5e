"""The items of a dataset entry: each media file (or folder of frames) with its caption.

Items are listed from the entry's folder (media files by extension, and for video entries also
sub-folders holding images, each a clip) or from its JSONL file, in sorted order. Cache file
names begin with the item's stem, so two items of one entry with the same stem are an error.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from wanlora.dataset.captions import read_caption, read_jsonl
from wanlora.dataset.config import DatasetConfig
from wanlora.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = ["MediaItem", "list_items", "find_control"]


@dataclass(frozen=True)
class MediaItem:
    """One image, clip or folder of frames of a dataset entry.

    Attributes:
        dataset: the entry's index in the TOML.
        path: the media file or folder (absolute).
        stem: the cache-name prefix (file name without extension).
        caption: the caption (or the entry's ``default_caption``); ``None`` when missing.
        problem: why this item cannot be used (missing caption, missing control clip, ...), else
            ``None``.
        control: the item's control clip, image or folder of frames (Fun-Control), else ``None``.
    """

    dataset: int
    path: Path
    stem: str
    caption: str | None
    problem: str | None = None
    control: Path | None = None


def _is_media(p: Path, kind: str) -> bool:
    if p.is_dir():
        return kind == "video" and any(
            q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir() if q.is_file()
        )
    exts = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
    return p.suffix.lower() in exts


def find_control(ds: DatasetConfig, stem: str) -> list[Path]:
    """The candidates for the control clip of the item ``stem`` in ``ds.control_directory``: media
    files named ``{stem}.<ext>`` (images for an image entry, videos for a video entry)
    and, for a video entry, a folder ``{stem}/`` of frames (musubi-tuner's rule)."""
    folder = ds.control_directory
    if folder is None or not folder.is_dir():
        return []
    exts = IMAGE_EXTENSIONS if ds.kind == "image" else VIDEO_EXTENSIONS
    found = [p for p in sorted(folder.glob(glob.escape(stem) + ".*")) if p.is_file() and p.suffix.lower() in exts]
    d = folder / stem
    if ds.kind == "video" and _is_media(d, "video"):
        found.append(d)
    return found


def _with_control(ds: DatasetConfig, item: MediaItem, control: Path | None, where: str) -> MediaItem:
    """``item`` with its control clip, or with a problem naming what is missing (Fun-Control)."""
    if not ds.needs_control or item.problem:
        return item
    problem = None
    if ds.is_jsonl:
        if control is None:
            problem = f"{where}: no \"control_path\" for {item.path.name}; add the control clip's path to the line"
        elif not control.exists():
            problem = f"{where}: control_path {control} not found; fix the path or create the control clip"
    else:
        found = find_control(ds, item.stem)
        if not found:
            problem = (f"{item.path}: no control clip {item.stem}.* (or folder {item.stem}/) in control_directory "
                       f"{ds.control_directory} ({ds.name}); add it, or remove the item")
        elif len(found) > 1:
            problem = (f"{item.path}: several control clips for it in {ds.control_directory}: "
                       f"{', '.join(p.name for p in found)}; keep one")
        else:
            control = found[0]
    return MediaItem(item.dataset, item.path, item.stem, item.caption, problem, control if not problem else None)


def list_items(ds: DatasetConfig) -> list[MediaItem]:
    """All items of one entry, sorted by path; problems are recorded per item, not raised.

    A caption-file entry takes ``{stem}{caption_extension}`` beside each media file; a JSONL
    entry takes the ``caption`` field. Bad JSONL lines, and a line naming a media file an earlier
    line named, become items with a ``problem``. For a Fun-Control task (``ds.needs_control``)
    each item also takes its control clip (:func:`find_control`, or the JSONL ``control_path``);
    a missing one is the item's problem.
    """
    items: list[MediaItem] = []
    if ds.is_jsonl:
        key = "image_path" if ds.kind == "image" else "video_path"
        records, problems = read_jsonl(ds.source, key)
        for problem in problems:
            items.append(MediaItem(ds.index, ds.source, ds.source.stem, None, problem))
        first_line: dict[Path, int] = {}
        for r in records:
            caption = r.caption or ds.default_caption
            problem = None if caption else (
                f"{ds.source}:{r.line}: no caption for {r.path.name}; add a \"caption\" or set default_caption")
            if r.path in first_line:  # one cache per media file: a second line would fight the first
                problem = (f"{ds.source}:{r.line}: {r.path.name} is listed again (first on line "
                           f"{first_line[r.path]}); remove the duplicate line, or use num_repeats to weight it")
            first_line.setdefault(r.path, r.line)
            item = MediaItem(ds.index, r.path, r.path.stem if r.path.suffix else r.path.name, caption, problem)
            items.append(_with_control(ds, item, r.control, f"{ds.source}:{r.line}"))
    else:
        for p in sorted(ds.source.iterdir()):
            if p.name.startswith(".") or not _is_media(p, ds.kind):
                continue
            stem = p.stem if p.is_file() else p.name
            cap_path = p.with_name(stem + ds.caption_extension)
            problem = None
            try:
                caption = read_caption(cap_path)
            except ValueError as e:
                caption, problem = None, str(e)
            caption = caption or ds.default_caption
            if caption is None and problem is None:
                problem = f"{p}: no caption; write {cap_path.name} beside it or set default_caption in the dataset config"
            items.append(_with_control(ds, MediaItem(ds.index, p, stem, caption, problem), None, str(p)))
    seen: dict[str, Path] = {}
    out = []
    for it in items:
        if it.problem is None and it.stem in seen and seen[it.stem] != it.path:
            it = MediaItem(it.dataset, it.path, it.stem, it.caption,
                           f"{it.path}: same stem '{it.stem}' as {seen[it.stem]}; their caches would collide, rename one",
                           it.control)
        seen.setdefault(it.stem, it.path)
        out.append(it)
    return out
