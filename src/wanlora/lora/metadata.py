"""Self-describing LoRA metadata: building it at save time and reading it back.

A LoRA file written by wanlora carries three groups of safetensors metadata (all strings;
``reference/lora_formats.md`` §2 and §7.4):

* musubi-tuner / kohya ``ss_*`` keys (``ss_network_module``, ``ss_network_dim``,
  ``ss_network_alpha``, ``ss_network_args``, ``ss_base_model_version`` = ``"wan"`` as musubi
  writes, plus whatever training options the trainer passes);
* ModelSpec ``modelspec.*`` (``sai_model_spec`` 1.0.0, ``architecture`` = the task's SwarmUI id,
  ``implementation``, ``title``, ``date``, ``resolution``, ``timestep_range``);
* ``wan.*``: ``wan.task``, ``wan.base_model``, ``wan.expert`` (``high_noise`` | ``low_noise`` |
  ``both``; empty for a single-model task), ``wan.boundary``, ``wan.timestep_range``,
  ``wan.pair_file``, ``wan.key_format`` (``default`` | ``comfy`` | ``diffusers``),
  ``wan.alpha_folded`` (``true`` when the alpha is folded into the tensors; then
  ``ss_network_alpha`` equals the rank), ``wan.base_model_hash``.

No client routes on these fields; they are for people, model managers (SwarmUI reads
``modelspec.architecture``) and wanlora's own loaders (``wanlora-merge-lora`` refuses a LoRA
made for another task or expert).

Also here: the coverage check (which blocks and layers a LoRA touches), because the default
layout loads in diffusers only when it covers the 10 Linear layers of every block.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from wanlora.lora.layouts import BLOCK_LINEARS, WAN21_I2V_LINEARS, lora_modules
from wanlora.tasks import Task, get_task

__all__ = [
    "EXPERT_CHOICES",
    "build_lora_metadata",
    "update_metadata_for_layout",
    "LoraInfo",
    "read_lora_metadata",
    "expert_for_range",
    "coverage_warnings",
    "check_lora_for_task",
    "checkpoint_quick_hash",
    "PARTIAL_DEFAULT_WARNING",
    "split_expert_name",
    "expert_file_name",
    "partner_path",
]

log = logging.getLogger(__name__)

#: Values of ``wan.expert`` (empty string: a single-model task).
EXPERT_CHOICES = ("high_noise", "low_noise", "both")

PARTIAL_DEFAULT_WARNING = (
    "this LoRA does not cover all {n_expected} Linear layers of every block ({detail}); "
    "ComfyUI, musubi-tuner and Wan2GP load it, but diffusers' loader refuses partial files in the "
    "default lora_unet_* layout (KeyError/IndexError in load_lora_weights). For diffusers users, "
    "convert it: wanlora-convert-lora --input FILE --target comfy"
)


def _s(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _range_str(r: tuple[float, float]) -> str:
    return f"{_fmt_num(r[0])},{_fmt_num(r[1])}"


def build_lora_metadata(
    task: str | Task,
    *,
    network_dim: int,
    network_alpha: float,
    expert: str | None = None,
    network_module: str = "networks.lora_wan",
    network_args: dict | list | None = None,
    title: str | None = None,
    base_model: str | os.PathLike | None = None,
    base_model_hash: str | None = None,
    timestep_range: tuple[float, float] | None = None,
    pair_file: str | None = None,
    key_format: str = "default",
    alpha_folded: bool = False,
    date: str | None = None,
    extra: dict | None = None,
) -> dict[str, str]:
    """The metadata of a LoRA file (every value a string).

    Args:
        task: the ``--task`` (name or :class:`~wanlora.tasks.Task`).
        network_dim: LoRA rank (``ss_network_dim``).
        network_alpha: LoRA alpha (``ss_network_alpha``; scale = alpha / rank).
        expert: ``"high_noise"`` / ``"low_noise"`` (one A14B expert), ``"both"`` (one LoRA for
            both experts) or None: ``"both"`` for an A14B task, ``""`` for a single model.
        network_module: ``ss_network_module`` (musubi's name, ``networks.lora_wan``).
        network_args: the ``--network_args`` as parsed (JSON in ``ss_network_args``).
        title: ``modelspec.title`` (default: task + expert).
        base_model: the ``--dit`` path or a name; only the file/folder name is written.
        base_model_hash: ``wan.base_model_hash`` (e.g. :func:`checkpoint_quick_hash`).
        timestep_range: (min, max) trained timesteps on 0..1000; default: the expert's range
            (``Task.timestep_range``).
        pair_file: file name of the other expert's LoRA (``X_low_noise.safetensors``).
        key_format: ``wan.key_format`` of the file written (``default`` for training saves).
        alpha_folded: whether alpha is folded into the tensors (then pass alpha = rank).
        date: ``modelspec.date`` (default: now, UTC, ISO 8601).
        extra: more keys (``ss_learning_rate``, ``ss_seed``, ``ss_steps``, ...); values are
            stringified (dicts/lists as JSON) and override the keys built here.

    Raises:
        ValueError: an unknown expert, or an expert given for a single-model task.
    """
    t = get_task(task)
    if expert in (None, "", "none"):
        expert = "both" if t.has_experts else ""
    if expert and expert not in EXPERT_CHOICES:
        raise ValueError(f"expert {expert!r}: use one of {', '.join(EXPERT_CHOICES)}")
    if expert and not t.has_experts:
        raise ValueError(f"expert {expert!r}: task {t.name} is a single model; leave the expert out")
    if timestep_range is None:
        timestep_range = t.timestep_range(expert if expert in ("high_noise", "low_noise") else None)
    family_repo = "Wan2.2" if t.family == "wan2.2" else "Wan2.1"
    if title is None:
        title = f"wanlora {t.name}" + (f" {expert}" if expert in ("high_noise", "low_noise") else "")
    md: dict[str, str] = {
        "ss_network_module": network_module,
        "ss_network_dim": _s(int(network_dim)),
        "ss_network_alpha": _fmt_num(network_alpha),
        "ss_network_args": _s(network_args if network_args is not None else {}),
        "ss_base_model_version": "wan",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": t.architecture,
        "modelspec.implementation": f"https://github.com/Wan-Video/{family_repo}",
        "modelspec.title": title,
        "modelspec.date": date or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{t.size[0]}x{t.size[1]}",
        "modelspec.timestep_range": _range_str(timestep_range),
        "wan.task": t.name,
        "wan.base_model": f"{t.family}-{t.name.lower()}",
        "wan.expert": expert,
        "wan.boundary": _fmt_num(t.boundary) if t.boundary is not None else "",
        "wan.timestep_range": _range_str(timestep_range),
        "wan.pair_file": pair_file or "",
        "wan.key_format": key_format,
        "wan.alpha_folded": _s(bool(alpha_folded)),
        "wan.base_model_hash": base_model_hash or "",
    }
    if base_model is not None:
        md["ss_sd_model_name"] = Path(base_model).name
    for k, v in (extra or {}).items():
        md[k] = _s(v)
    return md


def update_metadata_for_layout(
    metadata: dict[str, str], key_format: str, alpha_folded: bool, rank: int | None,
    pair_file: str | None = None,
) -> dict[str, str]:
    """Metadata of a converted file: ``wan.key_format`` / ``wan.alpha_folded`` set, and after
    folding ``ss_network_alpha`` = the rank (never an alpha that is already in the tensors).

    ``rank`` is the file's rank (None when ranks differ between modules: ``ss_network_alpha`` is
    then removed when folded). ``alpha_folded`` stays true once a file was folded.
    """
    md = dict(metadata)
    was_folded = md.get("wan.alpha_folded", "false") == "true"
    md["wan.key_format"] = key_format
    md["wan.alpha_folded"] = _s(bool(alpha_folded or was_folded))
    if alpha_folded:
        if rank is not None:
            md["ss_network_alpha"] = str(int(rank))
            md["ss_network_dim"] = str(int(rank))
        else:
            md.pop("ss_network_alpha", None)
    if pair_file is not None:
        md["wan.pair_file"] = pair_file
    if key_format == "diffusers":
        md.setdefault("format", "pt")
    return md


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA's metadata says (None where it says nothing).

    ``expert`` is ``wan.expert``, or for files without it (musubi-tuner's) inferred from
    ``modelspec.timestep_range`` when that lies inside one expert's range of the task
    (:func:`expert_for_range`).
    """

    task: str | None = None
    expert: str | None = None
    timestep_range: tuple[float, float] | None = None
    rank: int | None = None
    alpha: float | None = None
    key_format: str | None = None
    alpha_folded: bool = False
    pair_file: str | None = None
    base_model: str | None = None
    base_model_hash: str | None = None
    architecture: str | None = None


def _parse_range(s: str | None) -> tuple[float, float] | None:
    if not s:
        return None
    try:
        lo, hi = (float(x) for x in s.split(","))
    except ValueError:
        return None
    return (lo, hi)


def expert_for_range(task: str | Task, timestep_range: tuple[float, float] | None) -> str | None:
    """The A14B expert whose timesteps hold a trained range (musubi-tuner files name no expert).

    musubi-tuner trains one expert with ``--min_timestep``/``--max_timestep`` (for T2V A14B
    ``875,1000`` high noise, ``0,875`` low noise; I2V ``900,1000`` / ``0,900``) and writes the
    range as ``modelspec.timestep_range`` (0..1000 scale, ``t >= boundary*1000`` is high noise,
    as ``Task.boundary``). A range inside ``[boundary*1000, 1000]`` is the high-noise expert's,
    one inside ``[0, boundary*1000]`` the low-noise expert's.

    Returns:
        ``"high_noise"`` / ``"low_noise"``, or None: no range, a single-model task, an unknown
        task, or a range across the boundary (a LoRA for both experts, or a range meant for
        another task's boundary; the caller's flag decides).
    """
    if timestep_range is None:
        return None
    try:
        t = get_task(task)
    except (KeyError, ValueError):
        return None
    if not t.has_experts:
        return None
    lo, hi = timestep_range
    b = t.boundary_timestep
    if lo >= b and hi <= 1000.0 and lo < hi:
        return "high_noise"
    if lo >= 0.0 and hi <= b and lo < hi:
        return "low_noise"
    return None


def read_lora_metadata(metadata: dict[str, str], task: str | Task | None = None) -> LoraInfo:
    """Parse the metadata of a LoRA (ours, musubi's or a foreign file's; missing keys -> None).

    Args:
        metadata: the file's safetensors metadata.
        task: the task it is used for. A file without ``wan.expert`` (musubi-tuner's, which write
            only ``ss_*`` and ``modelspec.*`` keys) gets its expert from its timestep range against
            this task's boundary (:func:`expert_for_range`); its own ``wan.task``, when written,
            takes precedence over ``task``.
    """
    md = metadata or {}
    own_task = md.get("wan.task") or None
    rng = _parse_range(md.get("wan.timestep_range")) or _parse_range(md.get("modelspec.timestep_range"))
    expert = md.get("wan.expert") or None
    if expert is None:
        expert = expert_for_range(own_task or task, rng) if (own_task or task) else None
    task = own_task

    def num(key, cast):
        try:
            return cast(float(md[key]))
        except (KeyError, ValueError):
            return None

    return LoraInfo(
        task=task,
        expert=expert,
        timestep_range=rng,
        rank=num("ss_network_dim", int),
        alpha=num("ss_network_alpha", float),
        key_format=md.get("wan.key_format") or None,
        alpha_folded=md.get("wan.alpha_folded", "false") == "true",
        pair_file=md.get("wan.pair_file") or None,
        base_model=md.get("wan.base_model") or None,
        base_model_hash=md.get("wan.base_model_hash") or None,
        architecture=md.get("modelspec.architecture") or None,
    )


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def coverage_warnings(state_dict_or_paths, num_layers: int, emit: bool = True) -> list[str]:
    """Warnings for a default-layout LoRA that diffusers' strict converter would refuse.

    diffusers reads ``lora_unet_*`` files only when every block ``0..num_layers-1`` has all 10
    Linear layers (k_img/v_img all or none) and nothing outside the blocks
    (``reference/lora_formats.md`` §6.3); include/exclude patterns easily break that.

    Args:
        state_dict_or_paths: a LoRA state dict (any layout) or an iterable of Wan module paths
            (``blocks.0.self_attn.q``).
        num_layers: blocks in the DiT.
        emit: also log each warning (``logging.WARNING``).

    Returns:
        A list of warning strings (empty when the coverage is full).
    """
    if hasattr(state_dict_or_paths, "items"):
        paths = set(lora_modules(state_dict_or_paths))
    else:
        paths = set(state_dict_or_paths)
    problems = []
    blocks: dict[int, set[str]] = {}
    outside = sorted(p for p in paths if not _BLOCK_RE.match(p))
    for p in paths:
        m = _BLOCK_RE.match(p)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    missing_blocks = [i for i in range(num_layers) if i not in blocks]
    if missing_blocks:
        problems.append(f"blocks without LoRA: {_ranges(missing_blocks)}")
    partial = {i: sorted(set(BLOCK_LINEARS) - s) for i, s in blocks.items() if set(BLOCK_LINEARS) - s}
    if partial:
        layers = sorted({x for v in partial.values() for x in v})
        problems.append(f"layers missing in {len(partial)} block(s): {', '.join(layers)}")
    has_img = {i for i, s in blocks.items() if s & set(WAN21_I2V_LINEARS)}
    if has_img and has_img != set(blocks):
        problems.append("k_img/v_img in some blocks only")
    if outside:
        problems.append(f"modules outside the blocks: {', '.join(outside[:4])}")
    if not problems:
        return []
    msg = PARTIAL_DEFAULT_WARNING.format(n_expected=len(BLOCK_LINEARS), detail="; ".join(problems))
    if emit:
        log.warning(msg)
    return [msg]


def _ranges(xs: list[int]) -> str:
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = x
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def check_lora_for_task(state_dict_or_paths, task: str | Task) -> None:
    """Refuse Wan2.1-I2V-only modules (``k_img``, ``v_img``, ``img_emb``) in a LoRA for a task
    that has none (every task but ``i2v-14B`` / ``flf2v-14B``: Wan2.2 A14B I2V has no CLIP branch).

    Raises:
        ValueError: naming the modules and the fix (exclude them).
    """
    t = get_task(task)
    if t.uses_clip:
        return
    if hasattr(state_dict_or_paths, "items"):
        paths = set(lora_modules(state_dict_or_paths))
    else:
        paths = set(state_dict_or_paths)
    bad = sorted(p for p in paths if p.endswith(WAN21_I2V_LINEARS) or p.startswith("img_emb."))
    if bad:
        raise ValueError(
            f"the LoRA has Wan2.1-I2V-only modules ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
            f"that task {t.name} does not have (no CLIP image branch); exclude them "
            "(--network_args \"exclude_patterns=['.*(k_img|v_img|img_emb).*']\")"
        )


def checkpoint_quick_hash(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """A fast identity of a checkpoint (file, shard index or shard folder), for ``wan.base_model_hash``.

    sha256 over, for every shard in order, the safetensors header and the first and last
    ``sample_bytes`` of its data (``.pth``: the first and last bytes of the file). Not the sha256 of
    the file (that would read 28 GB); it changes when the weights file changes in practice.
    Returned as ``"quick-sha256:<first 16 hex digits>"``.
    """
    from wanlora.models.loading import checkpoint_files

    h = hashlib.sha256()
    for f in checkpoint_files(path):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(n))
                start = 8 + n
            else:
                start = 0
            fh.seek(start)
            h.update(fh.read(sample_bytes))
            fh.seek(max(start, size - sample_bytes))
            h.update(fh.read(sample_bytes))
    return "quick-sha256:" + h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Expert pair file names (``NAME_high_noise.safetensors`` / ``NAME_low_noise.safetensors``)

_EXPERT_SUFFIXES = {"high_noise": "_high_noise", "low_noise": "_low_noise"}


def split_expert_name(path: str | os.PathLike) -> tuple[str, str | None]:
    """``dir/X_high_noise.safetensors`` -> ``("dir/X", "high_noise")``; ``(stem path, None)``
    for a name without an expert suffix. The suffix must stand right before ``.safetensors``."""
    p = Path(path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    for expert, suffix in _EXPERT_SUFFIXES.items():
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return str(p.with_name(stem[: -len(suffix)])), expert
    return str(p.with_name(stem)), None


def expert_file_name(base: str | os.PathLike, expert: str | None) -> Path:
    """``("dir/X", "low_noise")`` -> ``dir/X_low_noise.safetensors`` (no suffix for None)."""
    b = Path(base)
    suffix = _EXPERT_SUFFIXES[expert] if expert else ""
    return b.with_name(b.name + suffix + ".safetensors")


def partner_path(path: str | os.PathLike) -> Path | None:
    """The other expert's file name of a ``_high_noise`` / ``_low_noise`` LoRA (None otherwise);
    the file may not exist."""
    base, expert = split_expert_name(path)
    if expert is None:
        return None
    return expert_file_name(base, "low_noise" if expert == "high_noise" else "high_noise")
