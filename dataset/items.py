"""The items of a dataset entry: each media file (or folder of frames) with its caption.

Items are listed from the entry's folder (media files by extension, and for video entries also
sub-folders holding images, each a clip) or from its JSONL file, in sorted order. Cache file
names begin with the item's stem, so two items of one entry with the same stem are an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wanlora.dataset.captions import read_caption, read_jsonl
from wanlora.dataset.config import DatasetConfig
from wanlora.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = ["MediaItem", "list_items"]


@dataclass(frozen=True)
class MediaItem:
    """One image, clip or folder of frames of a dataset entry.

    Attributes:
        dataset: the entry's index in the TOML.
        path: the media file or folder (absolute).
        stem: the cache-name prefix (file name without extension).
        caption: the caption (or the entry's ``default_caption``); ``None`` when missing.
        problem: why this item cannot be used (missing caption, ...), else ``None``.
    """

    dataset: int
    path: Path
    stem: str
    caption: str | None
    problem: str | None = None


def _is_media(p: Path, kind: str) -> bool:
    if p.is_dir():
        return kind == "video" and any(
            q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir() if q.is_file()
        )
    exts = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
    return p.suffix.lower() in exts


def list_items(ds: DatasetConfig) -> list[MediaItem]:
    """All items of one entry, sorted by path; problems are recorded per item, not raised.

    A caption-file entry takes ``{stem}{caption_extension}`` beside each media file; a JSONL
    entry takes the ``caption`` field. Bad JSONL lines, and a line naming a media file an earlier
    line named, become items with a ``problem``.
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
            items.append(MediaItem(ds.index, r.path, r.path.stem if r.path.suffix else r.path.name, caption, problem))
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
            items.append(MediaItem(ds.index, p, stem, caption, problem))
    seen: dict[str, Path] = {}
    out = []
    for it in items:
        if it.problem is None and it.stem in seen and seen[it.stem] != it.path:
            it = MediaItem(it.dataset, it.path, it.stem, it.caption,
                           f"{it.path}: same stem '{it.stem}' as {seen[it.stem]}; their caches would collide, rename one")
        seen.setdefault(it.stem, it.path)
        out.append(it)
    return out
