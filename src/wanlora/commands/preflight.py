"""Checks every command runs before any model loads: fail before the work, never after it.

A night of GPU time must not end in a read-only folder, a full disk, a VAE of the wrong kind at
the first sample, or a flag that was out of range from the start. Each check here reads only
flags, folder permissions, free space and checkpoint *headers* (no weights), so it costs
milliseconds, and raises one line naming the flag, the value and the fix (a ``ValueError``, which
:func:`wanlora.commands.cli.run_cli` prints as ``<prog>: error: ...`` with exit status 2), or
returns warnings for the caller to log.

The command-level entry points are :func:`preflight_train`, :func:`preflight_generate`,
:func:`preflight_merge` and :func:`preflight_cache_latents`; the pieces are public for the
commands that need only some of them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import torch

from wanlora.run_config import parse_dtype
from wanlora.tasks import EXPERTS, Task, get_task

__all__ = [
    "PreflightError",
    "check_output_dir",
    "check_output_file",
    "free_space_warning",
    "check_train_numbers",
    "dit_widths",
    "check_rank_fits",
    "vae_kind_of",
    "check_vae_for_task",
    "swapped_experts_warning",
    "lora_model_problems",
    "sample_flags_warning",
    "sample_lora_checks",
    "lora_file_bytes",
    "flat_flags",
    "preflight_train",
    "preflight_generate",
    "preflight_merge",
    "preflight_cache_latents",
]

log = logging.getLogger("wanlora.preflight")

_VAE_FILE = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}


class PreflightError(ValueError):
    """A flag, folder or file that would make the command fail later (message: one line with the fix)."""


# ------------------------------------------------------------------------------------------
# folders and disk space


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Make sure ``path`` is (or can become) a folder this process can write into.

    Creates the folder (with parents) and writes and removes a probe file in it — the one test
    that also catches read-only mounts, full quotas and ACLs that ``os.access`` misses.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    Raises:
        PreflightError: ``path`` (or a parent) is a file; the folder cannot be created or written
            (permissions, read-only file system, disk full) — one line with the fix.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PreflightError(f"{flag} {p}: is a file, not a folder; give a folder (it is created when missing)")
    blocker = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise PreflightError(f"{flag} {p}: {blocker} is a file, not a folder; choose another path")
    from wanlora.io_utils import os_error_fix

    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wanlora-write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"{flag} {p}: cannot write there: {os_error_fix(e, p)}") from None
    return p


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file to be written: not an existing folder, and its folder writable (:func:`check_output_dir`).

    Raises:
        PreflightError: one line naming the flag and the fix.
    """
    p = Path(path)
    if p.is_dir():
        raise PreflightError(f"{flag} {p}: is a folder; give a file name, e.g. {p / 'merged.safetensors'}")
    check_output_dir(p.parent if str(p.parent) else Path("."), f"{flag} (folder of {p.name})")
    return p


def free_space_warning(folder: str | os.PathLike, need_bytes: int, what: str) -> str | None:
    """A warning when the disk of ``folder`` has less free space than ``need_bytes`` (the
    expected size of ``what``), else None. Never raises (an unknown size is no warning)."""
    folder = Path(folder)
    existing = next((q for q in (folder, *folder.parents) if q.exists()), Path("."))
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return None
    if need_bytes <= free:
        return None
    gib = 2**30
    return (f"{existing}: {free / gib:.2f} GiB free, but {what} need about {need_bytes / gib:.2f} GiB; "
            "free space or choose another folder before the run fills the disk")


# ------------------------------------------------------------------------------------------
# numbers


def _ranges(args) -> Iterable[tuple[str, object, str]]:
    """``(flag, value, rule)`` for every numeric training flag with a range; value None = unset."""
    g = lambda name: getattr(args, name, None)  # noqa: E731
    yield "--gradient_accumulation_steps", g("gradient_accumulation_steps"), ">=1"
    if g("max_train_epochs") is None:
        yield "--max_train_steps", g("max_train_steps"), ">=1"
    yield "--max_train_epochs", g("max_train_epochs"), ">=1"
    for name in ("network_dim", "network_dim_high_noise", "expert_switch_every", "max_nonfinite_steps",
                 "save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs",
                 "save_last_n_steps_state", "save_last_n_epochs_state", "sample_every_n_steps",
                 "sample_every_n_epochs", "lr_scheduler_num_cycles", "validate_every_n_steps",
                 "validate_every_n_epochs", "validation_timesteps"):
        yield f"--{name}", g(name), ">=1"
    for name in ("network_alpha", "network_alpha_high_noise", "learning_rate", "learning_rate_high_noise"):
        yield f"--{name}", g(name), ">0"
    for name in ("lr_warmup_steps", "max_grad_norm", "max_data_loader_n_workers"):
        yield f"--{name}", g(name), ">=0"
    yield "--network_dropout", g("network_dropout"), "[0,1)"
    yield "--ema_decay", g("ema_decay"), "[0,1)"
    yield "--max_validation_steps", g("max_validation_steps"), ">=0"


_RULE_TEXT = {">=1": "must be at least 1", ">0": "must be above 0", ">=0": "must not be negative",
              "[0,1)": "must be in [0, 1)"}


def check_train_numbers(args) -> None:
    """Numeric training flags in range (a zero ``--gradient_accumulation_steps`` would divide by
    zero after the model loads; a negative ``--max_train_steps`` or ``--network_alpha`` would train
    nothing, or the wrong sign, without a word).

    Raises:
        PreflightError: every flag out of range, in one line (``--flag value: must be ...``).
    """
    bad = []
    for flag, v, rule in _ranges(args):
        if v is None:
            continue
        ok = {">=1": lambda x: x >= 1, ">0": lambda x: x > 0, ">=0": lambda x: x >= 0,
              "[0,1)": lambda x: 0 <= x < 1}[rule](v)
        if not ok:
            bad.append(f"{flag} {v}: {_RULE_TEXT[rule]}")
    if bad:
        raise PreflightError("; ".join(bad))


# ------------------------------------------------------------------------------------------
# checkpoints, from their headers


def dit_widths(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(dim, ffn_dim, num_layers)`` of a DiT checkpoint from its header (no weights read).

    Raises:
        CheckpointError: unreadable; PreflightError: not a Wan DiT (no ``patch_embedding``).
    """
    from wanlora.models.loading import checkpoint_shapes, official_dit_keys

    shapes = official_dit_keys(checkpoint_shapes(path, prefixes=("model.diffusion_model.", "diffusion_model.")))
    if "patch_embedding.weight" not in shapes:
        raise PreflightError(f"{path}: not a Wan DiT checkpoint (no patch_embedding.weight)")
    dim = shapes["patch_embedding.weight"][0]
    ffn = shapes.get("blocks.0.ffn.0.weight", (4 * dim,))[0]
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    return int(dim), int(ffn), layers


def check_rank_fits(rank: int, dim: int, flag: str = "--network_dim") -> None:
    """A LoRA rank above the narrowest adapted layer (the DiT's ``dim``: attention projections are
    ``dim x dim``) adds parameters that cannot raise the update's rank.

    Raises:
        PreflightError: ``rank > dim``.
    """
    if rank is not None and rank > dim:
        raise PreflightError(f"{flag} {rank}: above the width of the DiT's layers ({dim}), so the extra rank "
                             f"adds nothing; use at most {dim} (16-64 is usual)")


def lora_file_bytes(rank: int, dim: int, ffn_dim: int, num_layers: int, bytes_per_value: int) -> int:
    """Size of a LoRA file covering the 10 Linear layers of every block: 8 ``dim x dim``
    attention projections and the two FFN layers, ``rank · (in + out)`` values each (header not
    counted)."""
    per_block = 8 * rank * 2 * dim + 2 * rank * (dim + ffn_dim)
    return per_block * num_layers * bytes_per_value


def vae_kind_of(path: str | os.PathLike) -> str:
    """``"wan2.1"`` or ``"wan2.2"`` from a VAE checkpoint's header (no weights read), by the rule
    of :func:`wanlora.models.vae.detect_vae_kind`.

    Raises:
        CheckpointError: unreadable, or not a Wan VAE (the message names the flag that takes it).
    """
    from wanlora.models.loading import checkpoint_shapes
    from wanlora.models.vae import _PREFIXES, detect_vae_kind, diffusers_vae_to_official, is_diffusers_vae

    sd = {k: torch.empty(s, device="meta") for k, s in checkpoint_shapes(path, prefixes=_PREFIXES).items()}
    if is_diffusers_vae(sd):  # a diffusers AutoencoderKLWan (vae/ of the -Diffusers repositories)
        sd = diffusers_vae_to_official(sd, source=str(path))
    return detect_vae_kind(sd, source=str(path))


def check_vae_for_task(path: str | os.PathLike, task: Task, flag: str = "--vae", purpose: str = "") -> str:
    """The VAE file's kind matches the task's (Wan2.1 VAE for t2v/i2v, Wan2.2 VAE for TI2V-5B).

    Returns:
        The kind.
    Raises:
        FileNotFoundError: no such file. CheckpointError: not a VAE. PreflightError: the other VAE.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{flag} {path}: no such file{f' (needed {purpose})' if purpose else ''}")
    kind = vae_kind_of(path)
    if kind != task.vae:
        raise PreflightError(f"{flag} {path} is the {kind} VAE but task {task.name} uses the {task.vae} VAE; "
                             f"pass the {_VAE_FILE[task.vae]} file{f' ({purpose})' if purpose else ''}")
    return kind


def swapped_experts_warning(dit: str | None, dit_high_noise: str | None) -> str | None:
    """A warning when ``--dit`` (the low-noise expert) names high_noise and ``--dit_high_noise``
    names low_noise — the experts given the wrong way round (the rule of
    :func:`wanlora.tasks.expert_from_path`)."""
    from wanlora.tasks import expert_from_path

    if not (dit and dit_high_noise):
        return None
    lo, hi = expert_from_path(dit), expert_from_path(dit_high_noise)
    if lo == "high_noise" or hi == "low_noise":
        return (f"--dit {dit} names {lo or 'no expert'} and --dit_high_noise {dit_high_noise} names "
                f"{hi or 'no expert'}: the experts look swapped (--dit takes the low-noise expert); check the flags")
    return None


def lora_model_problems(task: Task, loras: Iterable[tuple[str, str | None]]) -> list[str]:
    """Problems of LoRA files against the model they will be applied to, from their metadata
    (``wan.task``, ``wan.expert``): the check ``wanlora-merge-lora`` refuses with
    (:func:`wanlora.lora.merge.lora_metadata_problems`), for ``(file, expert it goes to)`` pairs.
    A LoRA whose metadata says ``wan.expert`` goes to that expert in generation, so only a task
    mismatch or an expert LoRA on a single-model task is a problem there."""
    from wanlora.lora.merge import lora_metadata_problems
    from wanlora.models.loading import read_metadata

    problems = []
    for path, expert in loras:
        problems += lora_metadata_problems(path, read_metadata(path), task, expert)
    return problems


def sample_flags_warning(args) -> str | None:
    """A warning for ``--sample_prompts`` without ``--sample_every_n_steps`` /
    ``--sample_every_n_epochs`` / ``--sample_at_first``: no sample would ever be made."""
    if getattr(args, "sample_prompts", None) and not any(
            getattr(args, n, None) for n in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")):
        return ("--sample_prompts is given but no --sample_every_n_steps, --sample_every_n_epochs or "
                "--sample_at_first: no sample will be made; add one of them")
    return None


def sample_lora_checks(args, task: Task) -> list[str]:
    """``--sample_lora`` / ``--sample_lora_high_noise`` (``PATH[:MULT]``): each file exists and, by its
    metadata, fits the task (``wan.task``; an expert LoRA on a single model). Returns a warning when
    they are given without ``--sample_prompts`` (no sample to stack them on).

    Raises:
        FileNotFoundError / PreflightError / ValueError: one line naming the flag and the file.
    """
    from wanlora.lora.apply import parse_lora_spec
    from wanlora.lora.metadata import read_lora_metadata
    from wanlora.models.loading import read_metadata

    given = []
    for flag in ("sample_lora", "sample_lora_high_noise"):
        for spec in getattr(args, flag, None) or ():
            path, _ = parse_lora_spec(spec, f"--{flag}")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{flag} {path}: no such file")
            info = read_lora_metadata(read_metadata(path), task)
            if info.task and info.task != task.name:
                raise PreflightError(f"--{flag} {path}: made for task {info.task} (wan.task), not {task.name}")
            if info.expert in ("high_noise", "low_noise") and not task.has_experts:
                raise PreflightError(f"--{flag} {path}: made for the {info.expert} expert of an A14B model, but "
                                     f"{task.name} is a single model")
            given.append(f"--{flag}")
    if given and not getattr(args, "sample_prompts", None):
        return [f"{given[0]} is given without --sample_prompts: no sample is made, so it is not used"]
    return []


# ------------------------------------------------------------------------------------------
# per command


def flat_flags(config) -> SimpleNamespace:
    """The flags of a run as one flat namespace: an ``argparse.Namespace`` as it is, a (nested,
    frozen) run-config dataclass with its leaf fields lifted to the top (each leaf is named as its
    flag, ``config.network.network_dim`` -> ``network_dim``)."""
    if not dataclasses.is_dataclass(config):
        return config
    out = {}

    def walk(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                walk(v)
            else:
                out.setdefault(f.name, v)

    walk(config)
    return SimpleNamespace(**out)


def _emit(warnings: list[str]) -> list[str]:
    for w in warnings:
        log.warning(w)
    return warnings


def _loras(args) -> list[tuple[str, float, int]]:
    """``(key, rank, alpha)`` of each LoRA a training run creates (two with --dit_high_noise)."""
    out = [("low_noise" if args.dit_high_noise else None, args.network_dim, args.network_alpha)]
    if getattr(args, "dit_high_noise", None) and getattr(args, "expert_lora", "separate") != "shared":
        out.append(("high_noise", args.network_dim_high_noise or args.network_dim,
                    args.network_alpha if args.network_alpha_high_noise is None else args.network_alpha_high_noise))
    return out


def preflight_train(args) -> list[str]:
    """Everything about a training run that can be checked before the DiT loads (``args``: the
    parsed flags or the run config, :func:`flat_flags`).

    Numeric flags (:func:`check_train_numbers`); ``--output_dir`` (and ``--logging_dir``)
    writable; with ``--sample_prompts`` the ``--vae`` kind against the task (else the run dies at
    its first sample); ranks against the DiT's width; free space against the saves the run will
    keep. Returns the warnings (logged): swapped experts, samples never due, disk space.

    Raises:
        PreflightError / FileNotFoundError / CheckpointError: one line with the fix.
    """
    args = flat_flags(args)
    task = get_task(args.task)
    check_train_numbers(args)
    if getattr(args, "sample_with_ema", False) and getattr(args, "ema_decay", None) is None:
        raise PreflightError("--sample_with_ema needs --ema_decay (e.g. 0.999): without it there is no EMA to "
                             "sample with")
    warnings = []
    if args.output_dir is not None:
        check_output_dir(args.output_dir, "--output_dir")
    if getattr(args, "logging_dir", None):
        check_output_dir(args.logging_dir, "--logging_dir")
    if getattr(args, "sample_prompts", None) and getattr(args, "vae", None):
        check_vae_for_task(args.vae, task, purpose="for the samples during training")
    warnings += sample_lora_checks(args, task)
    for w in (swapped_experts_warning(args.dit, getattr(args, "dit_high_noise", None)), sample_flags_warning(args)):
        if w:
            warnings.append(w)
    dims = None
    if args.dit and Path(args.dit).exists():
        dims = dit_widths(args.dit)
        for key, rank, _ in _loras(args) if not getattr(args, "dim_from_weights", False) else ():
            check_rank_fits(rank, dims[0], "--network_dim_high_noise" if key == "high_noise"
                            and args.network_dim_high_noise else "--network_dim")
    if dims and args.output_dir is not None:
        bpv = parse_dtype(getattr(args, "save_precision", None) or "fp32").itemsize
        ema = 2 if getattr(args, "ema_decay", None) is not None else 1  # NAME_ema files beside the raw ones
        per_save = ema * sum(lora_file_bytes(r, *dims, bpv) for _, r, _ in _loras(args))
        state = sum(lora_file_bytes(r, *dims, 4) * (2 + ema) for _, r, _ in _loras(args))  # + AdamW's 2 moments
        every, keep = getattr(args, "save_every_n_steps", None), getattr(args, "save_last_n_steps", None)
        saves = (args.max_train_steps or 0) // every if every else 0
        if keep and every:
            saves = min(saves, keep // every + 1)
        saves += 1  # the final save
        need = saves * (per_save + (state if args.save_state else 0))
        w = free_space_warning(args.output_dir, need, f"{saves} save(s) of the LoRA"
                               + ("s and states" if args.save_state else "s"))
        if w:
            warnings.append(w)
    return _emit(warnings)


def preflight_generate(args) -> list[str]:
    """Before the models load in ``wanlora-generate`` (``args``: flags or run config): ``--save_path`` a writable folder, the
    ``--vae`` kind against the task (else found only after denoising), the LoRAs' task and
    expert against the model (refused as ``wanlora-merge-lora`` refuses), swapped experts (warned).

    Raises:
        PreflightError / FileNotFoundError / CheckpointError / LoraFormatError: one line.
    """
    args = flat_flags(args)
    task = get_task(args.task)
    check_output_dir(args.save_path, "--save_path")
    if getattr(args, "vae", None):
        check_vae_for_task(args.vae, task)
    from wanlora.lora.metadata import read_lora_metadata
    from wanlora.models.loading import read_metadata

    pairs = []
    for path, flag_expert in ([(p, "low_noise") for p in args.lora_weight or []]
                              + [(p, "high_noise") for p in getattr(args, "lora_weight_high_noise", None) or []]):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such LoRA file")
        declared = read_lora_metadata(read_metadata(path), task).expert
        # a LoRA whose metadata names its expert goes to that expert (wanlora.lora.apply.plan_loras)
        pairs.append((path, (declared if declared in EXPERTS else flag_expert) if task.has_experts else None))
    problems = lora_model_problems(task, pairs)
    if problems:
        raise PreflightError("refusing to apply: " + "; ".join(problems))
    w = swapped_experts_warning(args.dit, getattr(args, "dit_high_noise", None))
    return _emit([w] if w else [])


def preflight_merge(dit, output, save_dtype: torch.dtype | None = None) -> list[str]:
    """Before ``wanlora-merge-lora`` reads the checkpoint: the output a writable file path, and the
    free space against the merged file's size (the checkpoint's tensors in ``save_dtype``).

    Raises:
        PreflightError: one line.
    """
    from wanlora.models.loading import checkpoint_files

    check_output_file(output, "--save_merged_model")
    if save_dtype is None:
        size = sum(f.stat().st_size for f in checkpoint_files(dit))
    else:
        from wanlora.models.loading import checkpoint_shapes

        size = sum(math.prod(s) for s in checkpoint_shapes(dit).values()) * torch.empty(0, dtype=save_dtype).element_size()
    w = free_space_warning(Path(output).parent, size, "the merged model")
    return _emit([w] if w else [])


def preflight_cache_latents(config, task: Task, vae_path) -> None:
    """Before the VAE loads in ``wanlora-cache-latents``: the VAE kind against the task and at least
    one media file in the dataset (an empty dataset would cache nothing and exit 0).

    Raises:
        PreflightError / CheckpointError / FileNotFoundError: one line.
    """
    from wanlora.dataset.items import list_items

    if vae_path:
        check_vae_for_task(vae_path, task)
    empty = [ds for ds in config.datasets if not list_items(ds)]
    if empty and len(empty) == len(config.datasets):
        where = ", ".join(f"{ds.source_key} {ds.source}" for ds in empty)
        raise PreflightError(f"{config.path}: the dataset has no media files ({where}): nothing to cache; check "
                             "the folders, the JSONL and the file extensions")
    for ds in empty:
        log.warning("%s: %s has no media files (%s %s)", config.path, ds.name, ds.source_key, ds.source)
