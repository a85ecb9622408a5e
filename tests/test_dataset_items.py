"""Items and captions: caption files (UTF-8, BOM), JSONL, default caption, missing captions."""

from __future__ import annotations

import json

from wanlora.dataset.config import load_dataset_config
from wanlora.dataset.items import list_items


def _cfg(tmp_path, body):
    p = tmp_path / "d.toml"
    p.write_text(body)
    return load_dataset_config(p, "t2v-A14B")


def test_caption_files_bom_and_missing(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in ("a.jpg", "b.png", "c.webp", "notes.md"):
        (imgs / n).write_bytes(b"x")
    (imgs / "a.txt").write_bytes("\ufeff  un chat à lunettes \n".encode("utf-8"))
    (imgs / "b.txt").write_text("   \n")  # blank = missing
    cfg = _cfg(tmp_path, '[[datasets]]\nimage_directory = "imgs"\n')
    items = {i.stem: i for i in list_items(cfg.datasets[0])}
    assert set(items) == {"a", "b", "c"}
    assert items["a"].caption == "un chat à lunettes" and items["a"].problem is None
    assert "no caption" in items["b"].problem and "b.txt" in items["b"].problem
    assert "default_caption" in items["c"].problem
    cfg = _cfg(tmp_path, '[[datasets]]\nimage_directory = "imgs"\ndefault_caption = "a photo"\n')
    items = {i.stem: i for i in list_items(cfg.datasets[0])}
    assert items["c"].caption == "a photo" and items["c"].problem is None
    assert items["a"].caption == "un chat à lunettes"


def test_jsonl_relative_paths_and_bad_lines(tmp_path):
    (tmp_path / "v").mkdir()
    lines = [
        json.dumps({"video_path": "v/one.mp4", "caption": "first"}),
        "",
        "{not json",
        json.dumps({"video_path": "v/two.mp4"}),
        json.dumps({"video_path": "other/one.mp4", "caption": "dup stem"}),
    ]
    (tmp_path / "m.jsonl").write_text("\ufeff" + "\n".join(lines), encoding="utf-8")
    cfg = _cfg(tmp_path, '[[datasets]]\nvideo_jsonl_file = "m.jsonl"\ncache_directory = "c"\n')
    items = list_items(cfg.datasets[0])
    good = [i for i in items if i.problem is None]
    assert [(i.path, i.caption) for i in good] == [((tmp_path / "v" / "one.mp4").resolve(), "first")]
    problems = " | ".join(i.problem for i in items if i.problem)
    assert "m.jsonl:3: not valid JSON" in problems
    assert "m.jsonl:4: no caption for two.mp4" in problems
    assert "same stem 'one'" in problems


def test_video_folder_lists_frame_folders(tmp_path, media_dir):
    v = tmp_path / "v"
    (v / "frames_clip").mkdir(parents=True)
    (v / "frames_clip" / "0001.png").write_bytes(b"x")
    (v / "empty_dir").mkdir()
    (v / "frames_clip.txt").write_text("frames")
    (v / "dance.mp4").symlink_to(media_dir / "skeleton_dance.mp4")
    (v / "dance.txt").write_text("dance")
    cfg = _cfg(tmp_path, '[[datasets]]\nvideo_directory = "v"\n')
    items = list_items(cfg.datasets[0])
    assert [(i.stem, i.caption) for i in items] == [("dance", "dance"), ("frames_clip", "frames")]


def test_jsonl_listing_the_same_media_twice(tmp_path):
    """One media file, one cache: a second line for it is a problem on that line (it would be
    cached twice and then reported stale forever)."""
    lines = [json.dumps({"image_path": "a.jpg", "caption": "first"}),
             json.dumps({"image_path": "b.jpg", "caption": "other"}),
             json.dumps({"image_path": "./a.jpg", "caption": "again"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines), encoding="utf-8")
    cfg = _cfg(tmp_path, '[[datasets]]\nimage_jsonl_file = "m.jsonl"\ncache_directory = "c"\n')
    items = list_items(cfg.datasets[0])
    assert [(i.path.name, i.caption) for i in items if i.problem is None] == [("a.jpg", "first"), ("b.jpg", "other")]
    (dup,) = [i.problem for i in items if i.problem]
    assert dup == (f"{tmp_path / 'm.jsonl'}:3: a.jpg is listed again (first on line 1); remove the duplicate "
                   "line, or use num_repeats to weight it")
