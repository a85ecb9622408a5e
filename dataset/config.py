"""The dataset TOML: parse, validate and resolve it into :class:`DatasetConfig` entries.

The schema is the one musubi-tuner users know (see ``docs/dataset.md``)::

    [general]                      # defaults for every [[datasets]] entry
    resolution = [960, 544]        # [W, H]
    caption_extension = ".txt"
    batch_size = 1
    enable_bucket = true

    [[datasets]]
    video_directory = "clips"      # or image_directory / image_jsonl_file / video_jsonl_file
    cache_directory = "cache/clips"
    target_frames = [1, 17, 33]
    frame_extraction = "head"      # head | chunk | slide | uniform | full

    [[validation_datasets]]        # optional: held-out items for the validation loss
    video_directory = "held_out"   # same keys as [[datasets]], cached by the same commands
    cache_directory = "cache/held_out"

Validation reports every problem at once (file, entry, key, expected type or range); unknown keys
are errors with the closest known key suggested. Relative paths resolve against the TOML file's
folder. Frame counts are rounded down to 4n+1 (the VAE's temporal stride) with a warning, and
the resolution down to the task's ``pixel_unit`` with a warning.
"""

from __future__ import annotations

import difflib
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wanlora.dataset.frames import round_frames
from wanlora.conditioning import KINDS
from wanlora.tasks import TASKS, Task, get_task

__all__ = [
    "DatasetConfig",
    "DatasetGroupConfig",
    "DatasetConfigError",
    "DatasetConfigWarning",
    "FRAME_EXTRACTIONS",
    "load_dataset_config",
    "has_control_directory",
    "parse_dataset_config",
    "round_frames",
]

FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")
SOURCE_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")
VIDEO_KEYS = ("target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps")
COMMON_KEYS = (
    "resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket",
    "bucket_no_upscale", "default_caption",
)
GENERAL_KEYS = COMMON_KEYS + VIDEO_KEYS
DATASET_KEYS = COMMON_KEYS + VIDEO_KEYS + SOURCE_KEYS + ("cache_directory", "mask_directory", "control_directory")
#: musubi-tuner keys for features wanlora does not have: a clear error instead of "unknown key".
UNSUPPORTED_KEYS = {
    "control_resolution": "Fun-Control concatenates the control latents with the target's on channels, so "
                          "control frames always take the target's size",
    "no_resize_control": "Fun-Control concatenates the control latents with the target's on channels, so "
                         "control frames always take the target's size",
    "multiple_target": "layered (multiple target) images are not supported",
    "fp_latent_window_size": "FramePack options do not apply to Wan",
    "fp_1f_clean_indices": "FramePack options do not apply to Wan",
    "fp_1f_target_index": "FramePack options do not apply to Wan",
    "fp_1f_no_post": "FramePack options do not apply to Wan",
    "image_lance_dataset": "lance datasets are not supported",
}

DEFAULTS: dict[str, Any] = {
    "resolution": (960, 544),
    "caption_extension": ".txt",
    "batch_size": 1,
    "num_repeats": 1,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "default_caption": None,
    "target_frames": (1,),
    "frame_extraction": "head",
    "frame_stride": 1,
    "frame_sample": 1,
    "max_frames": 129,
    "source_fps": None,
}


class DatasetConfigError(ValueError):
    """The dataset TOML has problems; ``problems`` lists each one (file, entry, key, fix)."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s) in the dataset config:\n{lines}")


class DatasetConfigWarning(UserWarning):
    """A value was adjusted (frame count to 4n+1, resolution to the pixel unit)."""


@dataclass(frozen=True)
class DatasetConfig:
    """One resolved ``[[datasets]]`` entry (``[general]`` defaults applied, paths absolute).

    Attributes:
        index: position in the TOML (0-based); ``name`` is ``datasets[index]``.
        kind: ``"image"`` or ``"video"``.
        source: the media folder or JSONL file; ``source_key`` says which TOML key gave it.
        resolution: (W, H) in pixels, multiples of the task's ``pixel_unit``.
        cache_directory: where this entry's latent and text caches live (one folder per entry).
        target_frames / frame_extraction / frame_stride / frame_sample / max_frames / source_fps:
            the video frame-window options (images: one frame).
        default_caption: used when an item has no caption; ``None`` makes that an error.
        config_path: the TOML file.
        mask_directory: the folder of loss masks (:mod:`wanlora.dataset.masks`), or None.
        section: the TOML array it came from: ``datasets`` (training) or ``validation_datasets``
            (the validation loss, :mod:`wanlora.training.validation_loss`).
        control_directory: the folder of control clips/images (Fun-Control tasks: the item with
            the same stem, any media extension, or a folder of frames), or ``None`` (JSONL entries
            name them per line with ``control_path``).
        needs_control: every item needs a control clip (the task is a Fun-Control task).
    """

    index: int
    kind: str
    source: Path
    source_key: str
    cache_directory: Path
    resolution: tuple[int, int]
    caption_extension: str
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    default_caption: str | None
    target_frames: tuple[int, ...]
    frame_extraction: str
    frame_stride: int
    frame_sample: int
    max_frames: int
    source_fps: float | None
    config_path: Path
    mask_directory: Path | None = None
    section: str = "datasets"
    control_directory: Path | None = None
    needs_control: bool = False

    @property
    def name(self) -> str:
        """``datasets[i]`` / ``validation_datasets[i]``: how messages name this entry of the TOML."""
        return f"{self.section}[{self.index}]"

    @property
    def is_jsonl(self) -> bool:
        """True when the items come from a JSONL metadata file rather than a folder."""
        return self.source_key.endswith("_jsonl_file")

    def shaping_options(self) -> dict[str, Any]:
        """The options that shape a latent cache (recorded in its metadata)."""
        d = {k: v for k, v in asdict(self).items() if k in (
            "resolution", "enable_bucket", "bucket_no_upscale", "frame_extraction", "target_frames",
            "frame_stride", "frame_sample", "max_frames", "source_fps")}
        d["resolution"] = list(d["resolution"])
        d["target_frames"] = list(d["target_frames"])
        return d


@dataclass
class DatasetGroupConfig:
    """All entries of one dataset TOML, for one task: ``datasets`` train, ``validation_datasets``
    (``[[validation_datasets]]``, optional) only measure the validation loss."""

    path: Path
    task: Task
    datasets: list[DatasetConfig]
    warnings: list[str] = field(default_factory=list)
    validation_datasets: list[DatasetConfig] = field(default_factory=list)

    @property
    def all_datasets(self) -> list[DatasetConfig]:
        """Training then validation entries: what the caching commands cache."""
        return self.datasets + self.validation_datasets

    def validation(self) -> "DatasetGroupConfig | None":
        """The validation entries as a group of their own (what a
        :class:`wanlora.dataset.TrainingDataset` of the validation set reads), None without any."""
        if not self.validation_datasets:
            return None
        return DatasetGroupConfig(self.path, self.task, list(self.validation_datasets), list(self.warnings))


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


class _Checker:
    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def add(self, where: str, key: str | None, msg: str) -> None:
        self.problems.append(f"{where}{'.' + key if key else ''}: {msg}")

    def unknown_keys(self, where: str, table: dict, allowed: tuple[str, ...], hint: str = "") -> None:
        for key in table:
            if key in allowed:
                continue
            if key in UNSUPPORTED_KEYS:
                self.add(where, key, f"not supported by wanlora ({UNSUPPORTED_KEYS[key]}); remove it")
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(allowed)}"
            self.add(where, key, f"unknown key{hint}; {fix}")

    def integer(self, where, key, v, minimum=1):
        if isinstance(v, bool) or not isinstance(v, int):
            self.add(where, key, f"expected an integer >= {minimum}, got {_type_name(v)} {v!r}")
            return None
        if v < minimum:
            self.add(where, key, f"expected an integer >= {minimum}, got {v}")
            return None
        return v

    def boolean(self, where, key, v):
        if not isinstance(v, bool):
            self.add(where, key, f"expected true or false, got {_type_name(v)} {v!r}")
            return None
        return v

    def string(self, where, key, v):
        if not isinstance(v, str):
            self.add(where, key, f"expected a string, got {_type_name(v)} {v!r}")
            return None
        return v


def _check_value(c: _Checker, where: str, key: str, v: Any, task: Task, notes: list[str]) -> Any:
    """Validate one value; returns the normalized value or None (problem recorded)."""
    if key == "resolution":
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in v)):
            c.add(where, key, f"expected [width, height], two positive integers, got {v!r}")
            return None
        unit = task.pixel_unit
        w, h = (x // unit * unit for x in v)
        if w < unit or h < unit:
            c.add(where, key, f"expected sizes of at least {unit} px (the {task.name} pixel unit), got {v!r}")
            return None
        if (w, h) != tuple(v):
            notes.append(f"{where}.resolution {v} rounded down to [{w}, {h}] (multiples of {unit} px for {task.name})")
        return (w, h)
    if key == "caption_extension":
        v = c.string(where, key, v)
        if v is not None and not v.startswith("."):
            c.add(where, key, f"expected an extension starting with '.', e.g. \".txt\", got {v!r}")
            return None
        return v
    if key in ("batch_size", "num_repeats", "frame_stride", "frame_sample"):
        return c.integer(where, key, v)
    if key == "max_frames":
        v = c.integer(where, key, v)
        if v is not None and round_frames(v) != v:
            notes.append(f"{where}.max_frames {v} rounded down to {round_frames(v)} (frame counts are 4n+1)")
            v = round_frames(v)
        return v
    if key in ("enable_bucket", "bucket_no_upscale"):
        return c.boolean(where, key, v)
    if key == "default_caption":
        return c.string(where, key, v)
    if key == "target_frames":
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
            c.add(where, key, f"expected a non-empty list of positive integers (4n+1: 1, 5, 9, 13, 17, ...), got {v!r}")
            return None
        out = []
        for x in v:
            r = round_frames(x)
            if r != x:
                notes.append(f"{where}.target_frames {x} rounded down to {r} (frame counts are 4n+1)")
            if r not in out:
                out.append(r)
        return tuple(sorted(out))
    if key == "frame_extraction":
        if v not in FRAME_EXTRACTIONS:
            c.add(where, key, f"expected one of {', '.join(repr(x) for x in FRAME_EXTRACTIONS)}, got {v!r}")
            return None
        return v
    if key == "source_fps":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            c.add(where, key, f"expected a positive number (frames per second of the source), got {v!r}")
            return None
        return float(v)
    if key in ("cache_directory", "mask_directory", "control_directory") + SOURCE_KEYS:
        v = c.string(where, key, v)
        if v is not None and not v.strip():
            c.add(where, key, "expected a path, got an empty string")
            return None
        return v
    raise AssertionError(key)


def parse_dataset_config(data: dict, path: str | Path, task: str | Task) -> DatasetGroupConfig:
    """Validate a parsed TOML table; see :func:`load_dataset_config`."""
    path = Path(path).resolve()
    task = get_task(task)
    base = path.parent
    c = _Checker(path)
    notes: list[str] = []
    c.unknown_keys("", data, ("general", "datasets", "validation_datasets"),
                   " (top level takes [general], [[datasets]] and [[validation_datasets]])")

    general_raw = data.get("general", {})
    general: dict[str, Any] = {}
    if not isinstance(general_raw, dict):
        c.add("general", None, "expected a table [general]")
        general_raw = {}
    c.unknown_keys("general", general_raw, GENERAL_KEYS, " in [general]")
    for key, v in general_raw.items():
        if key in GENERAL_KEYS:
            general[key] = _check_value(c, "general", key, v, task, notes)

    entries = data.get("datasets")
    if entries is None:
        c.add("datasets", None, "no [[datasets]] entry; add at least one with image_directory, "
              "image_jsonl_file, video_directory or video_jsonl_file")
        entries = []
    elif not isinstance(entries, list) or any(not isinstance(e, dict) for e in entries):
        c.add("datasets", None, "expected an array of tables [[datasets]]")
        entries = []

    caches: dict[Path, str] = {}
    datasets = _entries(c, "datasets", entries, general, base, path, task, notes, caches)
    validation = data.get("validation_datasets", [])
    if not isinstance(validation, list) or any(not isinstance(e, dict) for e in validation):
        c.add("validation_datasets", None, "expected an array of tables [[validation_datasets]]")
        validation = []
    validation_datasets = _entries(c, "validation_datasets", validation, general, base, path, task, notes, caches)
    if c.problems:
        raise DatasetConfigError(path, c.problems)
    for note in notes:
        warnings.warn(f"{path}: {note}", DatasetConfigWarning, stacklevel=3)
    return DatasetGroupConfig(path=path, task=task, datasets=datasets, warnings=notes,
                              validation_datasets=validation_datasets)


def _entries(c: _Checker, section: str, entries: list, general: dict, base: Path, path: Path, task: Task,
             notes: list[str], caches: dict[Path, str]) -> list[DatasetConfig]:
    """Check and resolve the entries of one array of tables (``[[datasets]]`` or
    ``[[validation_datasets]]``; same keys); problems go to ``c``, cache folders to ``caches``
    (one entry per folder across both arrays)."""
    datasets: list[DatasetConfig] = []
    for i, entry in enumerate(entries):
        where = f"{section}[{i}]"
        c.unknown_keys(where, entry, DATASET_KEYS)
        values = {}
        for key, v in entry.items():
            if key in DATASET_KEYS:
                values[key] = _check_value(c, where, key, v, task, notes)
        sources = [k for k in SOURCE_KEYS if k in entry]
        if len(sources) != 1:
            c.add(where, None, "expected exactly one of " + ", ".join(SOURCE_KEYS)
                  + (f", got {', '.join(sources)}" if sources else ", got none"))
            continue
        source_key = sources[0]
        kind = "image" if source_key.startswith("image") else "video"
        if kind == "image":
            for key in VIDEO_KEYS:
                if key in entry:
                    c.add(where, key, "applies to video datasets only (this entry has " + source_key + ")")
        if None in values.values():
            continue
        merged = dict(DEFAULTS)
        merged.update({k: v for k, v in general.items() if v is not None})
        merged.update(values)
        source = (base / values[source_key]).resolve()
        if source_key.endswith("_directory"):
            if not source.is_dir():
                c.add(where, source_key, f"folder not found: {source}")
        elif not source.is_file():
            c.add(where, source_key, f"file not found: {source}")
        if "cache_directory" in values:
            cache = (base / values["cache_directory"]).resolve()
        elif source_key.endswith("_directory"):
            cache = source
        else:
            c.add(where, "cache_directory", f"required with {source_key} (a folder for this entry's caches)")
            continue
        mask_dir = None
        if "mask_directory" in values:
            mask_dir = (base / values["mask_directory"]).resolve()
            if not mask_dir.is_dir():
                c.add(where, "mask_directory", f"folder not found: {mask_dir}")
        if cache in caches:
            c.add(where, "cache_directory", f"{cache} is also used by {caches[cache]}; each [[datasets]] "
                  "and [[validation_datasets]] entry needs its own cache_directory")
        caches[cache] = where
        control = None
        uses_control = KINDS[task.conditioning].uses_control
        if "control_directory" in values:
            control = (base / values["control_directory"]).resolve()
            if not uses_control:  # a note, not an error: wanlora-cache-text reads any task's config
                fc = ", ".join(t.name for t in TASKS.values() if KINDS[t.conditioning].uses_control)
                notes.append(f"{where}.control_directory is read by the Fun-Control tasks ({fc}) only; "
                             f"--task {task.name} ignores it")
                control = None
            elif source_key.endswith("_jsonl_file"):
                c.add(where, "control_directory", f"with {source_key}, name each item's control clip with "
                      "\"control_path\" on its JSONL line; remove control_directory")
            elif not control.is_dir():
                c.add(where, "control_directory", f"folder not found: {control}")
        elif uses_control and source_key.endswith("_directory"):
            c.add(where, "control_directory", f"required by --task {task.name} (Fun-Control trains on a "
                  "control clip per item): add control_directory = \"path/to/controls\" (the control "
                  "clip of clips/a.mp4 is controls/a.mp4, any extension, or a folder controls/a/ of frames)")
        if kind == "image":
            merged.update(target_frames=(1,), frame_extraction="head", frame_stride=1, frame_sample=1,
                          max_frames=1, source_fps=None)
        elif merged["frame_extraction"] == "chunk" and 1 in merged["target_frames"]:
            notes.append(f"{where}.target_frames contains 1 with frame_extraction = \"chunk\": every frame "
                         "becomes its own 1-frame window")
        datasets.append(DatasetConfig(
            index=i, kind=kind, source=source, source_key=source_key, cache_directory=cache,
            resolution=tuple(merged["resolution"]), caption_extension=merged["caption_extension"],
            batch_size=merged["batch_size"], num_repeats=merged["num_repeats"],
            enable_bucket=merged["enable_bucket"], bucket_no_upscale=merged["bucket_no_upscale"],
            default_caption=merged["default_caption"], target_frames=tuple(merged["target_frames"]),
            frame_extraction=merged["frame_extraction"], frame_stride=merged["frame_stride"],
            frame_sample=merged["frame_sample"], max_frames=merged["max_frames"],
            source_fps=merged["source_fps"], config_path=path, mask_directory=mask_dir, section=section,
            control_directory=control, needs_control=uses_control,
        ))
    return datasets


def has_control_directory(path: str | Path) -> bool:
    """Whether a dataset TOML names control clips (an entry with ``control_directory``): a quick look
    before the task is known (``wanlora-cache-latents`` without ``--task``); an unreadable file is
    ``False`` (:func:`load_dataset_config` reports it)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    entries = [e for k in ("datasets", "validation_datasets") for e in (data.get(k) or []) if isinstance(e, dict)]
    return any("control_directory" in e for e in entries)


def load_dataset_config(path: str | Path, task: str | Task) -> DatasetGroupConfig:
    """Read and validate a dataset TOML for ``task``.

    Args:
        path: the TOML file; relative paths inside it resolve against its folder.
        task: a ``--task`` name or :class:`~wanlora.tasks.Task` (gives the pixel unit).

    Returns:
        :class:`DatasetGroupConfig` with one :class:`DatasetConfig` per ``[[datasets]]`` entry (and per
        ``[[validation_datasets]]`` entry, in ``validation_datasets``).

    Raises:
        DatasetConfigError: every problem at once (TOML syntax, unknown keys with the closest known
            key, wrong types and ranges, missing folders or files), each naming the entry and key.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetConfigError(path, ["file not found; pass --dataset_config path/to/dataset.toml"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise DatasetConfigError(path, [f"not valid TOML: {e}"]) from None
    except UnicodeDecodeError as e:
        raise DatasetConfigError(path, [f"not UTF-8 text: {e}"]) from None
    return parse_dataset_config(data, path, task)
