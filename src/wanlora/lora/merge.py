"""Merging LoRAs into a Wan DiT checkpoint, streamed (the library of ``wanlora-merge-lora``).

For every weight ``blocks.N.<layer>.weight`` a LoRA touches, the merged weight is
``W + sum_i multiplier_i · (alpha_i / rank_i) · up_i @ down_i`` (a LyCORIS LoHa/LoKr module: its
update) computed in float32 (:func:`wanlora.lora.algebra.module_delta`) and cast once to the output
dtype (musubi-tuner's ``merge_lora`` math, ``reference/lora_formats.md`` §4, but in float32). Everything else is copied
unchanged. LoRAs of any layout are read with :func:`wanlora.lora.layouts.load_lora_file`.

Streaming: the checkpoint (file, shard index or folder, ``.pth``) is read one tensor at a time with
plain reads (no memory map) and the output ``.safetensors`` is written tensor by tensor
(:mod:`wanlora.models.safetensors_stream`), so RAM holds the LoRAs plus a few copies of the largest
tensor — not the model. The output has the official key names (a ``model.diffusion_model.`` /
``diffusion_model.`` prefix is stripped) in one file; the header metadata keeps the source's,
adds ``num_heads`` from the folder's ``config.json`` (so :func:`wanlora.models.load_dit` sizes a
non-standard model right) and ``wan.merged_loras``.

Checks (each refused unless ``force``): a LoRA whose metadata names another ``wan.task``; an
expert LoRA (``wan.expert``) merged into the other expert (the DiT's expert comes from
``expert`` or a ``high_noise`` / ``low_noise`` in its path); a LoRA module the checkpoint does not
have or whose shape differs (with ``force`` those modules are skipped, with a warning).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from wanlora.lora.algebra import module_delta, module_shape
from wanlora.lora.layouts import load_lora_file, lora_modules
from wanlora.lora.metadata import read_lora_metadata
from wanlora.models.loading import (CheckpointError, checkpoint_files, config_num_heads, load_torch_file,
                                    official_dit_keys, read_config_json, read_metadata)
from wanlora.models.safetensors_stream import SafetensorsReader, SafetensorsStreamWriter
from wanlora.tasks import EXPERTS, expert_from_path, get_task

__all__ = ["MergeError", "dit_expert_from_path", "lora_metadata_problems", "merge_loras"]

log = logging.getLogger(__name__)

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class MergeError(ValueError):
    """A LoRA that does not belong to the checkpoint (task, expert, modules or shapes)."""


def dit_expert_from_path(path: str | Path) -> str | None:
    """``high_noise`` / ``low_noise`` when exactly one of them appears in the DiT's absolute path
    (``.../high_noise_model/``, ``wan2.2_t2v_low_noise_14B_fp16.safetensors``), else None; the
    rule of :func:`wanlora.tasks.expert_from_path` (which the trainer uses too)."""
    return expert_from_path(Path(path).resolve())


class _Source:
    """The checkpoint's tensors in file order, read one at a time: ``items()`` -> (key, dtype, shape)."""

    def __init__(self, path):
        self.files = checkpoint_files(path)
        self._readers: list = []
        self._where: dict[str, object] = {}
        self._info: dict[str, tuple] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                try:
                    r = SafetensorsReader(f)
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
                self._readers.append(r)
                for k in r.keys():
                    self._add(f, k, r, r.info(k))
            else:
                sd = load_torch_file(f)
                if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
                    sd = sd["state_dict"]
                for k, t in sd.items():
                    if isinstance(t, torch.Tensor):
                        self._add(f, k, sd, (t.dtype, tuple(t.shape)))
        keys = list(self._info)
        self.prefix = next((p for p in _PREFIXES if keys and all(k.startswith(p) for k in keys)), "")

    def _add(self, f, k, src, info):
        if k in self._info:
            raise CheckpointError(f"{f}: key {k!r} is also in another shard")
        self._where[k] = src
        self._info[k] = info

    def items(self):
        """``(key, dtype, shape)`` of every base tensor, from the headers (no data read)."""
        for k, (dtype, shape) in self._info.items():
            yield k, dtype, shape

    def get(self, key: str) -> torch.Tensor:
        """The base tensor ``key`` as a CPU tensor of its stored dtype (read from its shard)."""
        src = self._where[key]
        return src.get(key) if isinstance(src, SafetensorsReader) else src[key].clone()

    def close(self):
        """Close every shard reader."""
        for r in self._readers:
            r.close()


def lora_metadata_problems(path, metadata: dict[str, str], task, dit_expert: str | None) -> list[str]:
    """Problems of a LoRA's metadata against the task and the DiT's expert (empty: fine).

    Args:
        path: the LoRA file (for the messages).
        metadata: its safetensors metadata (``wan.task``, ``wan.expert``, ``modelspec.*``).
        task: the :class:`wanlora.tasks.Task` it is applied to.
        dit_expert: ``high_noise`` / ``low_noise`` / None (the DiT's expert, unknown).
    Returns:
        one line per problem: another task, an expert LoRA on a single model, on an unknown
        expert, or on the other expert — each naming the file and the fix.
    """
    info = read_lora_metadata(metadata, task)
    problems = []
    if info.task and info.task != task.name:
        problems.append(f"{path}: made for task {info.task} (wan.task), not {task.name}")
    if info.expert in EXPERTS:
        if not task.has_experts:
            problems.append(f"{path}: made for the {info.expert} expert of an A14B model, "
                            f"but {task.name} is a single model")
        elif dit_expert is None:
            problems.append(f"{path}: made for the {info.expert} expert; the DiT's expert is unknown "
                            f"(give --expert {info.expert} if the DiT is that expert)")
        elif dit_expert != info.expert:
            said = ("wan.expert" if metadata.get("wan.expert")
                    else f"modelspec.timestep_range {metadata.get('modelspec.timestep_range')}")
            problems.append(f"{path}: made for the {info.expert} expert ({said}), but the DiT is "
                            f"the {dit_expert} expert; use the {dit_expert} LoRA of the pair")
    return problems


def merge_loras(
    dit: str | Path,
    loras: list[tuple[str | Path, float]],
    output: str | Path,
    task: str,
    expert: str | None = None,
    save_dtype: torch.dtype | None = None,
    force: bool = False,
) -> dict:
    """Merge LoRAs into a DiT checkpoint, streaming, and write one ``.safetensors``.

    Args:
        dit: checkpoint file, shard index or shard folder (official key names, optional
            ``model.diffusion_model.`` prefix).
        loras: ``[(lora file, multiplier)]``; any layout.
        output: the merged ``.safetensors`` to write (atomically).
        task: ``--task``; LoRA metadata ``wan.task`` must match.
        expert: the DiT's expert (``high_noise``/``low_noise``); default from the path.
        save_dtype: dtype of the floating tensors written (None keeps each tensor's dtype).
        force: merge despite task/expert mismatches; skip modules the checkpoint lacks.

    Returns:
        ``{"merged_modules": int, "skipped": [str], "tensors": int}``.

    Raises:
        MergeError: a refused LoRA (message names the file, what differs and the fix).
        CheckpointError / LoraFormatError: unreadable inputs.
    """
    t = get_task(task)
    dit_expert = expert or dit_expert_from_path(dit)
    if Path(output).resolve() in {f.resolve() for f in checkpoint_files(dit)}:
        raise MergeError(f"--save_merged_model {output}: would overwrite the input checkpoint")
    source = _Source(dit)
    try:
        infos = {k: (dt, sh) for k, dt, sh in source.items()}
        # LoRA modules carry official names; a diffusers-layout transformer is merged under its own
        names = {k[len(source.prefix):]: k for k in infos}
        by_official = official_dit_keys(names)
        patch = infos.get(source.prefix + "patch_embedding.weight")
        problems = []
        if patch is not None and patch[1][1] != t.in_channels:
            problems.append(f"{dit}: the DiT takes {patch[1][1]} input channels, task {t.name} "
                            f"{t.in_channels}; check --task")
        # key -> [(module, multiplier)]
        updates: dict[str, list] = {}
        skipped: list[str] = []
        records = []
        for lora_path, mult in loras:
            sd, md = load_lora_file(lora_path)
            problems += lora_metadata_problems(lora_path, md, t, dit_expert)
            n = 0
            for path, e in lora_modules(sd, "default").items():
                key = by_official.get(path + ".weight", source.prefix + path + ".weight")
                shape = module_shape(e)
                if key not in infos:
                    skipped.append(f"{lora_path}: {path} (not in the checkpoint)")
                    continue
                if tuple(infos[key][1]) != shape:
                    skipped.append(f"{lora_path}: {path} (LoRA {shape} vs weight {tuple(infos[key][1])})")
                    continue
                updates.setdefault(key, []).append((e, mult))
                n += 1
            records.append({"file": Path(lora_path).name, "multiplier": mult, "modules": n})
        if skipped:
            problems.append(f"{len(skipped)} LoRA module(s) do not fit the checkpoint: "
                            + "; ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else "")
                            + " (wrong model size or task?)")
        if problems:
            if not force:
                raise MergeError("refusing to merge:\n  " + "\n  ".join(problems)
                                 + "\n(--force merges anyway and skips modules that do not fit)")
            for p in problems:
                log.warning("--force: %s", p)
        for key in updates:
            dt = infos[key][0]
            if dt in (torch.float8_e4m3fn, torch.float8_e5m2) and save_dtype is None:
                raise MergeError(f"{dit}: {key} is stored in {dt}; give --save_dtype bf16 (or fp16/fp32) "
                                 "to merge into an fp8 checkpoint")
        if any(k.endswith("scale_weight") for k in infos):
            raise MergeError(f"{dit}: a scaled-fp8 checkpoint (scale_weight keys) cannot be merged; "
                             "use the fp16/bf16 release")

        def out_dtype(dt):
            return save_dtype if (save_dtype is not None and dt.is_floating_point) else dt

        specs = {k[len(source.prefix):]: (out_dtype(dt), sh) for k, dt, sh in source.items()}
        metadata = dict(read_metadata(dit))
        heads = config_num_heads(read_config_json(dit))  # official num_heads or diffusers num_attention_heads
        if heads is not None and "num_heads" not in metadata:
            metadata["num_heads"] = str(heads)
        metadata["wan.task"] = t.name
        if dit_expert:
            metadata["wan.expert"] = dit_expert
        metadata["wan.merged_loras"] = json.dumps(records)
        with SafetensorsStreamWriter(output, specs, metadata) as w:
            for k, dt, _ in source.items():
                x = source.get(k)
                if k in updates:
                    x32 = x.float() if x.dtype != torch.float32 else x
                    for module, mult in updates[k]:
                        module_delta(module, mult, out=x32)
                    x = x32
                    del x32
                w.write(k[len(source.prefix):], x.to(out_dtype(dt)))
                del x
    finally:
        source.close()
    return {"merged_modules": len(updates), "skipped": skipped, "tensors": len(specs)}
