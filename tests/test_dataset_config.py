"""The dataset TOML: defaults, paths, validation that reports every problem at once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from wanlora.dataset.config import DatasetConfigError, DatasetConfigWarning, load_dataset_config


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "clips").mkdir(exist_ok=True)
    (tmp_path / "meta.jsonl").write_text('{"video_path": "clips/a.mp4", "caption": "a"}\n')
    p = tmp_path / "sub" / "dataset.toml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_general_defaults_and_relative_paths(tmp_path):
    p = write(tmp_path, """
[general]
resolution = [96, 64]
batch_size = 2
enable_bucket = true
default_caption = "a clip"

[[datasets]]
image_directory = "../imgs"
cache_directory = "../cache/imgs"
num_repeats = 3

[[datasets]]
video_directory = "../clips"
target_frames = [1, 17]
frame_extraction = "slide"
frame_stride = 4
source_fps = 30
batch_size = 1
""")
    cfg = load_dataset_config(p, "t2v-A14B")
    img, vid = cfg.datasets
    assert img.kind == "image" and img.source == (tmp_path / "imgs").resolve()
    assert img.cache_directory == (tmp_path / "cache" / "imgs").resolve()
    assert (img.resolution, img.batch_size, img.num_repeats, img.enable_bucket) == ((96, 64), 2, 3, True)
    assert img.target_frames == (1,) and img.default_caption == "a clip"
    assert vid.kind == "video" and vid.cache_directory == vid.source  # default: the media folder
    assert (vid.target_frames, vid.frame_extraction, vid.frame_stride, vid.source_fps) == ((1, 17), "slide", 4, 30.0)
    assert vid.batch_size == 1 and vid.caption_extension == ".txt"


def test_frames_and_resolution_rounded_with_warning(tmp_path):
    p = write(tmp_path, """
[[datasets]]
video_directory = "../clips"
resolution = [100, 70]
target_frames = [16, 17, 3]
max_frames = 50
""")
    with pytest.warns(DatasetConfigWarning) as rec:
        cfg = load_dataset_config(p, "ti2v-5B")
    ds = cfg.datasets[0]
    assert ds.target_frames == (1, 13, 17)
    assert ds.max_frames == 49
    assert ds.resolution == (96, 64)  # 32 px unit for ti2v-5B
    text = " ".join(str(w.message) for w in rec)
    assert "16 rounded down to 13" in text and "[96, 64]" in text


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, """
[general]
resolution = [960, "544"]
batch_sise = 2

[[datasets]]
video_directory = "../clips"
target_frame = [17]
frame_extraction = "random"
num_repeats = 0
enable_bucket = "yes"

[[datasets]]
image_directory = "../missing"
target_frames = [5]

[[datasets]]
video_jsonl_file = "../meta.jsonl"

[[datasets]]
control_resolution = [512, 512]
""")
    with pytest.raises(DatasetConfigError) as ei:
        load_dataset_config(p, "t2v-A14B")
    msg = str(ei.value)
    probs = ei.value.problems
    assert str(p.resolve()) in msg
    assert any("general.resolution" in q and "two positive integers" in q for q in probs)
    assert any("general.batch_sise" in q and "did you mean 'batch_size'" in q for q in probs)
    assert any("datasets[0].target_frame" in q and "did you mean 'target_frames'" in q for q in probs)
    assert any("datasets[0].frame_extraction" in q and "'head'" in q for q in probs)
    assert any("datasets[0].num_repeats" in q and ">= 1" in q for q in probs)
    assert any("datasets[0].enable_bucket" in q and "true or false" in q for q in probs)
    assert any("datasets[1].target_frames" in q and "video datasets only" in q for q in probs)
    assert any("datasets[1].image_directory" in q and "folder not found" in q for q in probs)
    assert any("datasets[2].cache_directory" in q and "required" in q for q in probs)
    assert any("datasets[3].control_resolution" in q and "not supported" in q for q in probs)
    assert len(probs) >= 10


@pytest.mark.parametrize("snippet, key, expect", [
    ('batch_size = 1.5', "batch_size", "expected an integer"),
    ('batch_size = true', "batch_size", "expected an integer"),
    ('source_fps = "30"', "source_fps", "positive number"),
    ('caption_extension = "txt"', "caption_extension", "starting with '.'"),
    ('target_frames = []', "target_frames", "non-empty list"),
])
def test_wrong_types(tmp_path, snippet, key, expect):
    p = write(tmp_path, f'[[datasets]]\nvideo_directory = "../clips"\n{snippet}\n')
    with pytest.raises(DatasetConfigError) as ei:
        load_dataset_config(p, "t2v-1.3B")
    assert any(f"datasets[0].{key}" in q and expect in q for q in ei.value.problems), ei.value.problems


def test_shared_cache_directory_and_toml_syntax(tmp_path):
    p = write(tmp_path, """
[[datasets]]
image_directory = "../imgs"
cache_directory = "../c"
[[datasets]]
video_directory = "../clips"
cache_directory = "../c"
""")
    with pytest.raises(DatasetConfigError, match="also used by datasets\\[0\\]"):
        load_dataset_config(p, "t2v-A14B")
    p.write_text("[[datasets]\nimage_directory = 1")
    with pytest.raises(DatasetConfigError, match="not valid TOML"):
        load_dataset_config(p, "t2v-A14B")
    with pytest.raises(DatasetConfigError, match="file not found"):
        load_dataset_config(tmp_path / "nope.toml", "t2v-A14B")


def test_no_warning_for_clean_config(tmp_path):
    p = write(tmp_path, '[[datasets]]\nvideo_directory = "../clips"\ntarget_frames = [1, 5, 81]\nresolution = [832, 480]\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_dataset_config(p, "t2v-A14B")
    assert cfg.datasets[0].target_frames == (1, 5, 81)
