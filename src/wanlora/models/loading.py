"""Reading checkpoints: single files, shard sets and ``.pth``, memory-mapped.

Shared by every model loader (DiT, VAE, text encoder). Reading never copies a checkpoint into RAM:
safetensors are opened with ``safe_open`` (memory-mapped, one tensor at a time) and ``.pth`` files
with ``torch.load(mmap=True, weights_only=True)``.

Accepted ``path`` forms:

* a ``.safetensors`` file;
* a sharded set: its index ``*.safetensors.index.json`` or the folder holding the shards (the
  official ``high_noise_model/`` and ``low_noise_model/`` folders, with ``config.json`` beside);
* a ``.pth`` / ``.pt`` / ``.bin`` file (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "CheckpointError",
    "checkpoint_files",
    "load_state_dict",
    "read_metadata",
    "read_config_json",
    "strip_prefix",
]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, or holding the wrong model."""


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files a checkpoint path stands for, in shard order.

    Raises:
        CheckpointError: the path does not exist, a folder holds no weight files, or an index
            names a shard that is missing.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            return checkpoint_files(indexes[0])
        files = sorted(p.glob("*.safetensors")) or sorted(
            f for s in _TORCH_SUFFIXES for f in p.glob(f"*{s}")
        )
        if not files:
            raise CheckpointError(
                f"{p}: the folder holds no .safetensors, index .json or .pth weights"
            )
        return files
    if p.name.endswith(".json"):
        try:
            weight_map = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{p}: not a safetensors shard index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        files = [p.parent / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{p}: shards named in the index are missing: {missing[:3]}")
        return files
    return [p]


def strip_prefix(keys_to_tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    """Remove the first of ``prefixes`` that every key starts with (e.g. ComfyUI's
    ``model.diffusion_model.``); keys are returned unchanged when no prefix is shared."""
    for prefix in prefixes:
        if keys_to_tensors and all(k.startswith(prefix) for k in keys_to_tensors):
            return {k[len(prefix):]: v for k, v in keys_to_tensors.items()}
    return keys_to_tensors


def _load_one(f: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                return {k: sf.get_tensor(k) for k in sf.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f"{f}: cannot read as safetensors ({e}); the file is truncated or not a "
                "safetensors file — download it again"
            ) from None
    try:
        obj = torch.load(str(f), map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"{f}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e}); the file is "
            "truncated or not a weights file — download it again"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{f}: holds no state dict of tensors")
    return obj


def load_state_dict(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint (memory-mapped where the format allows).

    Args:
        path: a file, shard index or shard folder (see the module docstring).
        device: where tensors are materialized; ``"cpu"`` keeps them memory-mapped.
        prefixes: key prefixes to strip when every key carries one (first match wins).

    Returns:
        ``{key: tensor}`` in the stored dtypes.

    Raises:
        CheckpointError: unreadable, truncated or missing files; a key found in two shards.
    """
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        part = _load_one(f, device)
        dup = out.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: keys also present in another shard: {sorted(dup)[:3]}")
        out.update(part)
    return strip_prefix(out, prefixes)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint (merged over shards; ``{}`` for .pth)."""
    meta: dict[str, str] = {}
    for f in checkpoint_files(path):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    meta.update(sf.metadata() or {})
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read the safetensors header ({e})") from None
    return meta


def read_config_json(path: str | os.PathLike) -> dict:
    """The ``config.json`` that official model folders carry beside their shards, or ``{}``."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
    return {}
