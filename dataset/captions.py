"""Captions: from a caption file beside each media file, or from a JSONL metadata file.

Text is UTF-8; a byte-order mark is tolerated; surrounding whitespace is stripped. A missing or
empty caption is an error for that item unless the dataset sets ``default_caption``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["read_caption", "read_jsonl", "JsonlRecord"]


def read_caption(path: str | Path) -> str | None:
    """The caption in a text file, or ``None`` when the file is missing or blank.

    Raises:
        ValueError: the file is not UTF-8 text (names the file).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not UTF-8 text ({e}); re-save it as UTF-8") from None
    return text or None


@dataclass(frozen=True)
class JsonlRecord:
    """One JSONL line: media path (absolute), caption (``None`` if absent), line number, and the
    control clip (``control_path``, absolute; Fun-Control datasets) or ``None``."""

    path: Path
    caption: str | None
    line: int
    control: Path | None = None


def read_jsonl(path: str | Path, path_key: str) -> tuple[list[JsonlRecord], list[str]]:
    """Read a metadata JSONL (``{"video_path": ..., "caption": ...}`` per line, optionally
    ``"control_path"``: the item's control clip or image, Fun-Control).

    Relative media paths resolve against the JSONL file's folder. Blank lines are skipped.

    Returns:
        (records, problems): a problem per bad line (``file:line: reason``); good lines still
        become records.
    """
    path = Path(path)
    records, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        return [], [f"{path}: not UTF-8 text ({e})"]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(path_key), str):
            problems.append(f"{path}:{n}: expected an object with a string \"{path_key}\"")
            continue
        caption = obj.get("caption")
        if caption is not None and not isinstance(caption, str):
            problems.append(f"{path}:{n}: \"caption\" must be a string")
            continue
        control = obj.get("control_path")
        if control is not None and not isinstance(control, str):
            problems.append(f"{path}:{n}: \"control_path\" must be a string")
            continue
        caption = caption.strip() if caption else None
        records.append(JsonlRecord((path.parent / obj[path_key]).resolve(), caption or None, n,
                                   (path.parent / control).resolve() if control else None))
    return records, problems
